"""Re-export of the float64 oracle (``gdncheck_reference``)."""
from gdncheck_reference import *  # noqa: F401,F403
from gdncheck_reference import __all__  # noqa: F401
