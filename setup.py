"""Package list for setuptools (everything else is in pyproject.toml).

``conf/`` stays at the top of the repository and is installed as the package data of
``cirlab.conf`` (``package-dir`` in pyproject.toml), so a wheel carries the Hydra config tree;
pyproject.toml alone cannot list the found packages and that mapped one together.
"""

from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages("src", include=["cirlab", "cirlab.*"]) + ["cirlab.conf"])
