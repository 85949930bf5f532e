from .fixtures import lab, lab_guest  # noqa: F401  (fixtures for the tests in this directory)
