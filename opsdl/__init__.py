"""opsdl: the thin OPSDL trainer built on ``opsdl_kernels``."""
__version__ = "0.1.0"
