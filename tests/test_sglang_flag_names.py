"""Misspelled ``--sglang-<flag>`` / ``--router-<flag>`` passthrough words are config problems on the driver
(``plugrl train --dry-run`` too), checked against what is installed: the real ``sglang_router``'s parser
(a dev dependency), and the installed SGLang's ``server_args.py`` source (SGLang itself is not a dev
dependency: that test runs where it is installed; the source reader is also checked on a small file
written here in the layout of SGLang's ``ServerArgs``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from plugrl.core.config import config_problems, parse_config
from plugrl.core.plugins import load_plugins
from plugrl.plugins.backends.sglang import flag_names

BASE = ["--rm-type", "deepscaler", "--rollout-batch-size", "4", "--rollout-backend", "sglang"]

SERVER_ARGS = '''
import dataclasses
from typing import Annotated as A


@dataclasses.dataclass
class ServerArgs:
    model_path: A[str, "weights"]
    tp_size: A[int, "tensor parallel"] = 1
    mem_fraction_static: A[float | None, "fraction"] = None
    enable_metrics: bool = False

    @staticmethod
    def add_cli_args(parser):
        parser.add_argument("--config", help="a meta argument, not a field")
        parser.add_argument("--tensor-parallel-size", dest="tp_size", help="an alias")
'''


def test_the_server_source_reader_takes_fields_aliases_and_hand_written_flags(tmp_path):
    path = tmp_path / "server_args.py"
    path.write_text(SERVER_ARGS)
    flags = flag_names.server_flags_from_source(path)
    assert flags == {"--model-path", "--tp-size", "--mem-fraction-static", "--enable-metrics", "--config",
                     "--tensor-parallel-size"}
    problems = flag_names.unknown_flag_problems({"mem_fractoin_static": "0.5", "tp_size": "2", "enable_metrics": True},
                                                flags, "--sglang-", "this server")
    assert problems == ["--sglang-mem-fractoin-static: this server has no flag --mem-fractoin-static; "
                        "did you mean --sglang-mem-fraction-static?"]


FIELDS_PARALLEL = '''
from typing import Annotated as A, ClassVar

import msgspec


class Parallel(msgspec.Struct):
    _NS_PATH: ClassVar[str] = "parallel"
    tp_size: A[int, Arg(help="tensor parallel", aliases=["--tensor-parallel-size"])] = 1
    dp_size: A[int, "data parallel"] = 1
'''


def test_the_reader_takes_the_field_classes_of_sglang_0_5_20_on(tmp_path):
    """From 0.5.20 ``server_args.py`` declares almost no field: ``ServerArgs`` collects them from the classes
    in ``arg_groups/fields/*.py``. Reading only ``server_args.py`` refused every passthrough flag there."""
    srt = tmp_path / "srt"
    (srt / "arg_groups" / "fields").mkdir(parents=True)
    (srt / "server_args.py").write_text("class ServerArgs:\n    pass\n\nHAND_WRITTEN = '--config'\n")
    (srt / "arg_groups" / "fields" / "parallel.py").write_text(FIELDS_PARALLEL)
    assert flag_names.server_flags_from_package(srt) == {"--config", "--tp-size", "--tensor-parallel-size", "--dp-size"}
    # a class elsewhere in server_args.py is no field source (only ServerArgs is)
    (srt / "server_args.py").write_text("class Helper:\n    not_a_flag: int = 0\n")
    assert "--not-a-flag" not in flag_names.server_flags_from_package(srt)


def test_router_words_are_checked_against_the_real_sglang_router():
    pytest.importorskip("sglang_router")
    known = flag_names.installed_router_flags()
    assert {"--policy", "--cache-threshold", "--balance-abs-threshold", "--prometheus-port"} <= known
    plugin_set = load_plugins()
    good = parse_config(BASE + ["--router-cache-threshold", "0.3"], plugin_set)
    assert not [p for p in config_problems(good, plugin_set) if "--router-" in p]
    bad = parse_config(BASE + ["--router-polcy", "round_robin"], plugin_set)
    assert "--router-polcy: the installed sglang_router has no flag --polcy; did you mean --router-policy?" in \
        config_problems(bad, plugin_set)


def test_server_words_are_checked_against_the_installed_sglang():
    installed = flag_names.installed_server_flags()
    if installed is None:
        pytest.skip("SGLang is not installed here (not a dev dependency); the source reader is tested above")
    flags, _path = installed
    assert {"--model-path", "--tp-size", "--mem-fraction-static", "--chunked-prefill-size"} <= flags
    plugin_set = load_plugins()
    good = parse_config(BASE + ["--sglang-chunked-prefill-size", "4096", "--sglang-enable-metrics"], plugin_set)
    assert not [p for p in config_problems(good, plugin_set) if "has no flag" in p]
    bad = parse_config(BASE + ["--sglang-chunked-prefil-size", "4096"], plugin_set)
    assert any(p.startswith("--sglang-chunked-prefil-size: the installed SGLang server") and
               p.endswith("did you mean --sglang-chunked-prefill-size?") for p in config_problems(bad, plugin_set))


def test_dry_run_stops_on_a_misspelled_router_word(tmp_path):
    pytest.importorskip("sglang_router")
    out = subprocess.run([sys.executable, "-m", "plugrl.core.cli", "train", "--dry-run", "--router-polcy", "x"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode != 0
    assert "--router-polcy: the installed sglang_router has no flag --polcy; did you mean --router-policy?" in out.stderr
