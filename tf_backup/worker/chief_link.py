"""`ChiefLink`: what a worker reads from the chief's aggregator in its own process.

Only the chief's own worker has one (`ChiefLink(...)`); every other worker
gets `NONE`, which reports no failure, no dead worker and no parameters kept
here, so the worker reads everything from the ps tasks.
"""

import dataclasses
from typing import Callable, List, Optional, Sequence

import numpy as np

from tf_backup import errors


def _no_failure() -> Optional[BaseException]:
    return None


@dataclasses.dataclass(frozen=True)
class ChiefLink:
    """The chief's aggregator, as the worker in the same process sees it.

    Attributes:
      failure: why the aggregator stopped, if it failed (else None).
      dead_workers: the workers the chief declared dead.
      published: (`Aggregator.published`) the flat parameters this process
        published for a step, or None if not kept. Itself None where the
        parameters are not kept here (a non-chief worker, or the update applied
        on the ps): the worker then reads them from the ps. Given, the chief's
        steps read only the control vector from the ps, not the parameters it
        sent there.
    """

    failure: Callable[[], Optional[BaseException]] = _no_failure
    dead_workers: Callable[[], Sequence[int]] = tuple
    published: Optional[Callable[[int], Optional[List[np.ndarray]]]] = None

    @property
    def reads_params_here(self) -> bool:
        """Whether a step takes its parameters from `published` (else from the ps)."""
        return self.published is not None

    def raise_if_failed(self) -> None:
        """Raises the failure of the aggregator, once it failed.

        A `WorkersLostError` (any `AggregatorError`) is raised as the
        aggregator raised it, so that `fit` raises that type; any other error
        as the cause of an `AggregatorError` (a `PsUnavailableError` too:
        raised as it is, the worker's waits would take it for their own run's
        and wait for the ps).
        """
        failure = self.failure()
        if isinstance(failure, errors.AggregatorError):
            raise failure
        if failure is not None:
            raise errors.AggregatorError(
                f"The aggregator on this chief failed: {type(failure).__name__}: {failure}") from failure


NONE = ChiefLink()  # a worker that is not the chief
