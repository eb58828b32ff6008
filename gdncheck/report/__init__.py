"""Reports: the results schema, loading and merging runs, summaries, Markdown/HTML/JUnit, comparison."""
from gdncheck.report.schema import (SCHEMA_VERSION, CaseResult, Contracts, Environment, RunHeader, TensorMetrics,
                                    Timing)

__all__ = ["SCHEMA_VERSION", "CaseResult", "Contracts", "Environment", "RunHeader", "TensorMetrics", "Timing",
           "load_results", "write_results", "merge_results", "summarize", "compare", "register"]
# the renderer is the submodule gdncheck.report.render (render(), render_cli())


def __getattr__(name):  # lazy: keeps `import gdncheck.report.schema` free of matplotlib
    if name in ("load_results", "write_results", "merge_results", "ResultsError"):
        from gdncheck.report import io
        return getattr(io, name)
    if name in ("summarize", "failure", "outcome"):
        from gdncheck.report import summary
        return getattr(summary, name)
    if name == "compare":
        from gdncheck.report.compare import compare
        return compare
    if name == "register":
        from gdncheck.report.cli import register
        return register
    raise AttributeError(name)
