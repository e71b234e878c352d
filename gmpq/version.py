"""gmpq's version, in one place: ``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``) and so does the package
(``gmpq.__version__``, the ``gmpq_version`` recorded in policies, model directories and ``env.json``)."""

__version__ = "0.1.0"
