"""The bottom layer: documented pydantic schemas of cases, results and verdicts, results files,
and the exit codes. Imports nothing from the layers above (nor torch)."""
from gdncheck.data.case import Case, DType, GateDist, Op, Padding
from gdncheck.data.errors import EnvironmentProblem, Exit, GdncheckError, UsageError
from gdncheck.data.io import ResultsError, latest, load_results, merge_results, result_key, write_results
from gdncheck.data.results import (SCHEMA_VERSION, CaseResult, Contracts, Environment, Fingerprint, RunHeader,
                                   TensorMetrics, Timing)

__all__ = ["Case", "DType", "GateDist", "Op", "Padding", "EnvironmentProblem", "Exit", "GdncheckError", "UsageError",
           "ResultsError", "latest", "load_results", "merge_results", "result_key", "write_results",
           "SCHEMA_VERSION", "CaseResult", "Contracts", "Environment", "Fingerprint", "RunHeader", "TensorMetrics",
           "Timing"]
