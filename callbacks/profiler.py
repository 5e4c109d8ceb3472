"""debug=profile: Lightning's SimpleProfiler that also prints its table at the end of the run (Lightning only writes
it to `<dirpath>/<filename>` when a file is given, and logs it at INFO otherwise, which the entry points keep quiet)."""

from __future__ import annotations

from lightning.pytorch.profilers import SimpleProfiler


class PrintedSimpleProfiler(SimpleProfiler):
    def describe(self) -> None:
        summary = self.summary()  # before describe() tears the profiler down
        super().describe()
        if summary and self._local_rank in (None, 0):
            print(summary, flush=True)
