"""What a user sees on stderr: progress bars and vgrt's own lines only; library warnings are silenced where
they arise, and `vgrt -v` shows everything."""

import logging
import re
import subprocess
import sys
import warnings

from vgrt.cli import main
from vgrt.library_noise import warnings_silenced
from vgrt.runtime.schedulers import build_scheduler, set_timesteps

from .cli_args import mca_ctrl_args

# Lines vgrt logs are tagged "[vgrt...] " by the logging format the test process sets up before the CLI does.
TAGGED_CLI = (
    "import logging, sys\n"
    "logging.basicConfig(format='[%(name)s] %(message)s', level=logging.WARNING)\n"
    "from vgrt.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
PROGRESS_BAR = re.compile(r"^[\w .-]+: +\d+%\|")  # tqdm: "denoise:  50%|█████     | 2/4 [...]"
VGRT_LINE = re.compile(r"^\[vgrt(\.[\w.]+)?\] ")


def stderr_lines(*argv: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", TAGGED_CLI, *argv], check=False, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return [line for line in re.split(r"[\r\n]", result.stderr) if line.strip()]


def test_a_warm_compose_shows_progress_bars_and_vgrt_lines_only(examples, tmp_path, composer_cache):
    args = mca_ctrl_args(examples, tmp_path / "out.png", "--cache", str(composer_cache))
    assert main(args) == 0  # warms the cache (the session's, shared with other tests)
    lines = stderr_lines(*args)
    foreign = [line for line in lines if not (PROGRESS_BAR.match(line) or VGRT_LINE.match(line))]
    assert foreign == []
    assert any(line.startswith("denoise: 100%|") for line in lines)
    verbose = stderr_lines("-v", *args)
    assert len(verbose) > len(lines)
    assert any(VGRT_LINE.match(line) for line in verbose)


def test_silenced_warnings_are_only_the_named_ones(caplog):
    caplog.set_level(logging.INFO, logger="vgrt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with warnings_silenced((DeprecationWarning, "old api")):
            warnings.warn("old api, use the new one", DeprecationWarning, stacklevel=1)
            warnings.warn("old api, use the new one", UserWarning, stacklevel=1)  # another category
            warnings.warn("something else", DeprecationWarning, stacklevel=1)
        warnings.warn("old api, use the new one", DeprecationWarning, stacklevel=1)  # after the block
    assert [(w.category, str(w.message)) for w in caught] == [
        (UserWarning, "old api, use the new one"),
        (DeprecationWarning, "something else"),
        (DeprecationWarning, "old api, use the new one"),
    ]


def test_verbose_logging_keeps_every_warning(caplog):
    caplog.set_level(logging.DEBUG, logger="vgrt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with warnings_silenced((DeprecationWarning, "old api")):
            warnings.warn("old api", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["old api"]


def test_dpm_solver_timesteps_warn_only_with_verbose_logging(caplog):
    scheduler = build_scheduler("dpmsolver++")
    caplog.set_level(logging.INFO, logger="vgrt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_timesteps(scheduler, 4)
    caplog.set_level(logging.DEBUG, logger="vgrt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_timesteps(scheduler, 4)
    assert any("__array__ implementation" in str(w.message) for w in caught), (
        "DPM-Solver no longer warns here: drop the filter in vgrt/runtime/schedulers.py"
    )
