"""Running the notebooks headless for `switch-sae reproduce`: which notebooks, their parameters (papermill's
convention: an injected cell after the `parameters` cell), executing them with nbclient while echoing their
output to the terminal (`NotebookEcho`), and writing them as .ipynb and offline HTML."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError


def notebook_paths(selected: Optional[Sequence[str]] = None) -> list[Path]:
    from .paths import project_root

    folder = project_root() / "notebooks"
    if selected is not None:
        paths = [Path(s) if Path(s).is_file() else folder / s for s in selected]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"notebook(s) not found: {missing}; available: {[p.name for p in sorted(folder.glob('*.ipynb'))]}")
        return paths
    return sorted(folder.glob("[0-9][0-9]_*.ipynb"))


@contextlib.contextmanager
def _environment(**values: Optional[str]):
    """Set (or, for None, unset) environment variables for the duration; notebook kernels inherit them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def execute_notebook(path: Path, out_dir: Path, profile: str, timeout: int | None = None,
                     echo: Optional["NotebookEcho"] = None) -> float:
    """Run a notebook headless (cwd = its folder; PROFILE injected after its parameters cell, and
    SWITCH_SAE_PROFILE set), write the executed .ipynb and an .html export to `out_dir`; return seconds.
    While it runs, `echo` (default: a `NotebookEcho` on stdout) shows its printed lines, its progress bars and
    its slow cells as they happen. On an error the partial notebook is still written."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, PROFILE=profile)
    # the kernel application's own log at ERROR: over local TCP ipykernel warns "Kernel is running over TCP
    # without encryption" for every notebook (IPC would avoid it, but its sockets did not answer here); the
    # notebooks' own output and Python warnings are untouched
    echo = NotebookEcho(sys.stdout) if echo is None else echo

    class EchoingClient(NotebookClient):  # nbclient's hooks see no output as it arrives: its `output` does
        def output(self, outs, msg, display_id, cell_index):
            if msg["msg_type"] == "stream":
                echo.stream(msg["content"].get("text", ""))
            return super().output(outs, msg, display_id, cell_index)

        def handle_comm_msg(self, outs, msg, cell_index):
            echo.widget(msg["content"])
            return super().handle_comm_msg(outs, msg, cell_index)

    client = EchoingClient(nb, timeout=timeout, kernel_name="python3",
                           extra_arguments=["--IPKernelApp.log_level=ERROR"],
                           resources={"metadata": {"path": str(path.parent)}},
                           on_cell_execute=lambda cell, cell_index: echo.cell_started(),
                           on_cell_executed=lambda cell, cell_index, execute_reply: echo.cell_finished(cell))
    t0 = time.perf_counter()
    try:
        with _environment(SWITCH_SAE_PROFILE=profile):
            client.execute()
    except CellExecutionError:
        _write_notebook(nb, out_dir / path.name)
        raise
    _write_notebook(nb, out_dir / path.name)
    html, _ = HTMLExporter(config=_offline_html_config()).from_notebook_node(nb)
    (out_dir / path.with_suffix(".html").name).write_text(html)
    return time.perf_counter() - t0


class NotebookEcho:
    """What a notebook run headless shows on the terminal as it runs (`execute_notebook`), each line indented
    under the runner's own: its stdout/stderr lines (a text progress bar's carriage-return redraws: the last
    one), its tqdm widget bars (`tqdm.auto` draws widgets in a kernel: at most one line per `every_s` seconds,
    and each bar's last state), and one line per code cell that took at least `slow_s` seconds. At most
    `max_lines` lines per cell (the rest is in the executed notebook and its .html), each cut at `width`."""

    PREFIX = "    | "

    def __init__(self, file, every_s: float = 30.0, slow_s: float = 5.0, max_lines: int = 40, width: int = 160,
                 clock=time.monotonic):
        self.file, self.every_s, self.slow_s, self.max_lines, self.width = file, every_s, slow_s, max_lines, width
        self.clock = clock
        self._partial = ""  # a stream line not ended yet
        self._left = ""  # a tqdm widget's latest left text ("train topk:  40%"): its right text comes next
        self._last_bar = -float("inf")
        self._t0, self._lines = 0.0, 0

    def cell_started(self) -> None:
        self._t0, self._lines, self._partial = self.clock(), 0, ""

    def cell_finished(self, cell) -> None:
        self._flush_partial()
        seconds = self.clock() - self._t0
        if seconds >= self.slow_s:
            first = next((line for line in cell.get("source", "").splitlines()
                          if line.strip() and not line.lstrip().startswith("#")), "")
            self._print(f"cell {cell.get('execution_count') or '?'} done in {seconds:.0f}s: {first.strip()}",
                        counted=False)

    def stream(self, text: str) -> None:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()  # "" when the text ended with a newline
        for line in lines:
            self._print(line.rsplit("\r", 1)[-1])  # a redrawn bar: its last state
        if "\r" in self._partial:  # a text progress bar redrawn in place: shown now and then, not each redraw
            self._partial = self._partial.rsplit("\r", 1)[-1]
            self._bar(self._partial, final=False)

    def widget(self, content: dict) -> None:
        """A comm message: tqdm's widget bar sets its left text, then its right text ("40/600 [00:05<01:10,
        ...]"), as widget state updates."""
        state = (content.get("data") or {}).get("state") or {}
        value = state.get("value")
        if not isinstance(value, str):
            return
        import html
        import re

        text = html.unescape(value).replace("\u2007", " ").strip()
        match = re.match(r"(\d+)(?:/(\d+))? \[", text)
        if match is None:
            self._left = text
            return
        self._bar(f"{self._left} {text}".strip(), final=match.group(1) == match.group(2))

    def _bar(self, line: str, final: bool) -> None:
        now = self.clock()
        if final or now - self._last_bar >= self.every_s:
            self._last_bar = now
            self._print(line, counted=False)

    def _flush_partial(self) -> None:
        if self._partial.strip():
            self._print(self._partial)
        self._partial = ""

    def _print(self, line: str, counted: bool = True) -> None:
        line = line.rstrip()
        if len(line) > self.width:
            line = line[:self.width - 3] + "..."
        if counted:
            self._lines += 1
            if self._lines > self.max_lines:
                if self._lines > self.max_lines + 1:
                    return
                line = "... (more output in the executed notebook)"
        print(self.PREFIX + line, file=self.file, flush=True)


def inject_parameters(nb, **params) -> None:
    """Papermill's convention: a code cell tagged 'injected-parameters' holding `NAME = value` lines,
    right after the cell tagged 'parameters' (an earlier injected cell is replaced). ValueError if the
    notebook has no parameters cell."""
    import nbformat

    cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    at = next((i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if at is None:
        raise ValueError("the notebook has no cell tagged 'parameters': tag the cell of its parameters")
    source = "# Parameters\n" + "\n".join(f"{name} = {value!r}" for name, value in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells = cells[:at + 1] + [cell] + cells[at + 1:]


def _offline_html_config():
    """HTML export that shows a widget's text/html view (viz.widgets.show_widget) instead of the widget,
    which would need a kernel and JavaScript from a CDN: the exported page reads offline."""
    from nbconvert.exporters.html import HTMLExporter
    from traitlets.config import Config

    widget_view = "application/vnd.jupyter.widget-view+json"
    default = HTMLExporter().config.NbConvertBase.display_data_priority
    priority = [t for t in default if t != widget_view] + [widget_view]
    config = Config()
    config.NbConvertBase.display_data_priority = priority
    return config


def _write_notebook(nb, path: Path) -> None:
    import nbformat

    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
