"""tf_backup: synchronous SGD with backup workers for TensorFlow 2 / Keras 3."""

import setuptools

setuptools.setup(
    name="tf_backup",
    version="0.1.0",
    description=(
        "Synchronous SGD with backup workers (Chen et al., 2016) as a "
        "tf.distribute strategy and a Keras optimizer wrapper."
    ),
    packages=setuptools.find_packages(
        include=["tf_backup", "tf_backup.*", "trainers", "trainers.*", "configs"]),
    package_data={"configs": ["*.json"]},
    entry_points={"console_scripts": ["tf-backup-train = trainers.train:run"]},
    python_requires=">=3.10",
    # tf_backup uses TensorFlow internals (see tf_backup/frontend/_tf_internal.py): the supported
    # versions are declared here and nowhere else, exactly those `.ci/versions.py` passed
    # (docs/versions.md; tests/test_versions.py holds the two together).
    install_requires=[
        "tensorflow>=2.16,<2.22",  # docs/versions.md: what passed
        "keras>=3.15,<4",
        "tensorflow-datasets>=4.9",
        "tensorboard>=2.16",  # the trainers write TensorBoard scalars; TF 2.21 no longer pulls it in
        "absl-py>=2.0",
        "numpy>=1.26",
    ],
    extras_require={
        # CI lints with pyflakes, then runs pytest; kubernetes-validate bundles the Kubernetes API schemas
        # (1.37 and older) that tests/test_deploy.py checks deploy/kubernetes/ against, offline.
        "test": ["pytest>=8", "pyflakes>=3", "kubernetes-validate>=1.37", "jsonschema>=4.18", "pyyaml>=6"],
        "bench": ["matplotlib>=3.8"],  # plots of `python -m benchmarks.run`; skipped with a notice without it
    },
)
