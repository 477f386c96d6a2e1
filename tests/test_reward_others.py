"""math, dapo, math_verify and remote_rm rewards (reference §3.3-3.5); remote_rm against a real
HTTP server on loopback."""

import asyncio
import http.server
import json
import threading

import pytest

from plugrl.core import Sample
from plugrl.core.plugins import make_plugin_manager


@pytest.fixture(scope="module")
def rewards():
    plugin_set = make_plugin_manager(entry_points=False)
    return {name: plugin_set.get("reward", name) for name in ("math", "dapo", "math_verify", "remote_rm")}


# ---- math (grade_answer_verl) ---------------------------------------------------------------------


def test_math_reads_the_last_boxed_anywhere(rewards):
    math = rewards["math"]
    assert math(Sample(response="so \\boxed{4} or rather \\boxed{5}", label="5"), timeout=0) == 1
    assert math(Sample(response="so \\boxed{4} or rather \\boxed{5}", label="4"), timeout=0) == 0
    assert math(Sample(response="the answer is 5", label="5"), timeout=0) == 0


def test_math_equivalences_and_boxed_label(rewards):
    math = rewards["math"]
    assert math(Sample(response="\\boxed{\\frac12}", label=0.5), timeout=0) == 1
    assert math(Sample(response="\\boxed{\\sqrt{2}/2}", label="\\boxed{\\frac{\\sqrt{2}}{2}}")) == 1
    assert math(Sample(response="\\boxed{2/4}", label="1/2"), timeout=0) == 0


def test_math_falsy_label_scores_zero(rewards):
    # slime's grade_answer_verl starts with `if not ground_truth: return False`.
    assert rewards["math"](Sample(response="\\boxed{0}", label=0), timeout=0) == 0
    assert rewards["math"](Sample(response="\\boxed{0}", label="0"), timeout=0) == 1


# ---- dapo ------------------------------------------------------------------------------------------


def test_dapo_answer_line(rewards):
    assert rewards["dapo"](Sample(response="work...\nAnswer: 42", label="42")) == {"score": 1.0, "acc": True, "pred": "42"}
    assert rewards["dapo"](Sample(response="Answer: 41", label=42)) == {"score": -1.0, "acc": False, "pred": "41"}


def test_dapo_bare_boxed_scores_minus_one(rewards):
    result = rewards["dapo"](Sample(response="The answer is \\boxed{42}", label=42))
    assert result == {"score": -1.0, "acc": False, "pred": "[INVALID]"}


def test_dapo_normalises_the_answer(rewards):
    dapo = rewards["dapo"]
    assert dapo(Sample(response="Answer: $\\boxed{42}$", label="42"))["score"] == 1.0
    assert dapo(Sample(response="Answer: x = 1,000 dollars", label=1000))["pred"] == "1000"
    assert dapo(Sample(response="Answer: 7\nmore\nAnswer: 8", label="8"))["acc"] is True


def test_dapo_reads_only_the_last_300_characters(rewards):
    dapo = rewards["dapo"]
    inside = "Answer: 42\n" + "x" * 280
    outside = "Answer: 42\n" + "x" * 300
    assert dapo(Sample(response=inside, label=42))["score"] == 1.0
    assert dapo(Sample(response=outside, label=42)) == {"score": -1.0, "acc": False, "pred": "[INVALID]"}


def test_dapo_label_must_be_numeric(rewards):
    with pytest.raises(ValueError, match="integer label"):
        rewards["dapo"](Sample(response="Answer: abc", label="abc"))


def test_dapo_strict_box_option(rewards, caplog):
    from plugrl.plugins.rewards.dapo import _warn_non_string_label

    dapo = rewards["dapo"]
    sample = Sample(response="The answer is \\boxed{42}", label="42")
    assert dapo(sample, strict_box_verify="true") == {"score": 1.0, "acc": True, "pred": "42"}
    # slime's strict check compares the boxed text with the label object: an int label never matches
    numeric = Sample(response="Answer: 42\nThe answer is \\boxed{42}", label=42)
    _warn_non_string_label.cache_clear()  # warned once per process
    with caplog.at_level("WARNING"):
        assert dapo(numeric, strict_box_verify=True) == {"score": -1.0, "acc": False, "pred": "42"}
    assert "label of type int never equals the boxed text" in caplog.text
    assert dapo(numeric)["score"] == 1.0  # the default (Minerva) check reads the label as an integer
    far = Sample(response="\\boxed{42}" + " " * 100, label="42")
    assert dapo(far, strict_box_verify=True) == {"score": -1.0, "acc": False, "pred": None}
    with pytest.raises(ValueError, match="strict_box_verify"):
        dapo(sample, strict_box_verify="maybe")


# ---- math_verify -------------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [10, 0])
def test_math_verify(rewards, timeout):
    mv = rewards["math_verify"]
    assert mv(Sample(response="so \\boxed{\\frac{1}{2}}", label="0.5"), timeout=timeout) == 1.0
    assert mv(Sample(response="so \\boxed{\\sqrt{2}/2}", label="\\frac{1}{\\sqrt{2}}"), timeout=timeout) == 1.0
    assert mv(Sample(response="so \\boxed{2}", label="3"), timeout=timeout) == 0.0
    assert mv(Sample(response="so \\boxed{x^2-1}", label="(x-1)(x+1)"), timeout=timeout) == 1.0


def test_math_verify_needs_a_boxed_answer_unless_told(rewards):
    mv = rewards["math_verify"]
    sample = Sample(response="The answer is $\\frac{1}{2}$.", label="1/2")
    assert mv(sample) == 0.0
    assert mv(sample, require_boxed="false") == 1.0
    assert mv(Sample(response="\\boxed{1}", label="")) == 0.0


# ---- remote_rm ---------------------------------------------------------------------------------------


class _RewardServer:
    """A loopback HTTP server that fails the first ``failures`` requests with 500."""

    def __init__(self, body, failures=0):
        self.body, self.failures, self.requests = body, failures, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                server.requests.append((self.path, json.loads(self.rfile.read(length))))
                if len(server.requests) <= server.failures:
                    self.send_response(500)
                    self.end_headers()
                    return
                data = json.dumps(server.body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/reward"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _call_remote(fn, sample, **options):
    async def go():
        try:
            return await fn(sample, **options)
        finally:
            await fn.aclose()

    return asyncio.run(go())


def test_remote_rm_posts_prompt_response_label(rewards):
    sample = Sample(prompt="What is 6*7?", response="42", label="42")
    with _RewardServer(1.0) as server:
        assert _call_remote(rewards["remote_rm"], sample, url=server.url) == 1.0
    assert server.requests == [("/reward", {"prompt": "What is 6*7?", "response": "42", "label": "42"})]


def test_remote_rm_returns_dict_bodies(rewards):
    with _RewardServer({"score": 0.5, "acc": False}) as server:
        assert _call_remote(rewards["remote_rm"], Sample(response="r", label=1), url=server.url) == {"score": 0.5, "acc": False}


def test_remote_rm_retries_transient_errors(rewards):
    with _RewardServer(0.25, failures=2) as server:
        value = _call_remote(rewards["remote_rm"], Sample(response="r"), url=server.url, backoff_scale=0.001)
    assert value == 0.25
    assert len(server.requests) == 3


def test_remote_rm_raises_after_max_attempts(rewards):
    import aiohttp

    with _RewardServer(1.0, failures=100) as server:
        with pytest.raises(aiohttp.ClientResponseError) as info:
            _call_remote(rewards["remote_rm"], Sample(response="r"), url=server.url, max_attempts="3",
                         backoff_scale=0.001)
    assert info.value.status == 500
    assert len(server.requests) == 3


def test_remote_rm_backoff_schedule():
    from plugrl.plugins.rewards.remote_rm import backoff_seconds

    for attempt, low in [(0, 1), (1, 2), (3, 8), (4, 16), (5, 30), (9, 30)]:
        delay = backoff_seconds(attempt)
        assert low <= delay < low + 1


def test_remote_rm_needs_a_url(rewards):
    with pytest.raises(ValueError, match="url"):
        _call_remote(rewards["remote_rm"], Sample(response="r"))
