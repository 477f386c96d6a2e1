"""``--ray-address`` (core/ray_connect.py): a malformed address and an address nobody listens on are one
line naming the flag, on the driver, before the run writes its directory; a refused ``ray.init`` too."""

import socket
from types import SimpleNamespace

import pytest

from plugrl.core import ray_connect
from plugrl.core.train_cli import main as train_main


pytestmark = pytest.mark.usefixtures("no_ray_started")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["auto", "local", "10.0.0.1:6379", "head-node:6379", "ray://10.0.0.1:10001",
                                     "[::1]:6379"])
def test_ray_address_forms_accepted(address):
    assert ray_connect.ray_address_problems(SimpleNamespace(ray_address=address)) == []


@pytest.mark.parametrize("address", ["garbage", "10.0.0.1", "10.0.0.1:port", "host:70000", "http://h:8265"])
def test_malformed_ray_address_is_refused_naming_the_forms(address):
    (problem,) = ray_connect.ray_address_problems(SimpleNamespace(ray_address=address))
    assert problem == (f"--ray-address {address}: not a Ray address; give host:port (e.g. 10.0.0.1:6379), "
                       "ray://host:port (Ray client), auto (the cluster this machine joined) or local, or leave it "
                       "unset to start a local cluster")


def test_an_address_nobody_listens_on_is_refused_at_once(model, tmp_path, capsys):
    port = free_port()
    out = tmp_path / "out"
    code = train_main(["--hf-checkpoint", str(model), "--prompt-data",
                       "plugins/backends/torch/data/toy_math_train.jsonl", "--input-key", "prompt", "--label-key",
                       "label", "--rm-type", "deepscaler", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--num-rollout", "1",
                       "--ray-address", f"127.0.0.1:{port}", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert (f"--ray-address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} (Connection refused); start the "
            "cluster there (`ray start --head --port PORT` on the head node), correct the address, or leave it unset "
            "to start a local cluster") in err
    assert not out.exists()  # refused before the run wrote anything


def test_garbage_is_refused_before_the_run_writes_anything(model, tmp_path, capsys):
    out = tmp_path / "out"
    code = train_main(["--hf-checkpoint", str(model), "--rm-type", "deepscaler", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2",
                       "--num-rollout", "1", "--ray-address", "garbage", "--output-dir", str(out)])
    assert code == 2 and "plugrl train: error: --ray-address garbage: not a Ray address" in capsys.readouterr().err
    assert not out.exists()


def test_a_refused_ray_init_names_the_flag(monkeypatch):
    import ray

    def refuse(**_):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ray_connect.ClusterConnectError) as raised:
        ray_connect.join_cluster("auto")
    assert str(raised.value) == ("--ray-address auto: cannot join the Ray cluster (ConnectionError: Could not find any "
                                 "running Ray instance. Please specify the one to connect to.); check that the "
                                 "cluster is running and the address is right, or leave it unset to start a local "
                                 "cluster")


def test_plugrl_train_prints_a_refused_join_as_one_line(model, tmp_path, capsys, monkeypatch):
    from plugrl.core import loop

    def run_training(args, plugin_set, **_):
        raise ray_connect.ClusterConnectError("--ray-address auto: cannot join the Ray cluster (...)")

    monkeypatch.setattr(loop, "run_training", run_training)
    code = train_main(["--hf-checkpoint", str(model), "--rm-type", "deepscaler", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2",
                       "--num-rollout", "1", "--ray-address", "auto", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "plugrl train: error: --ray-address auto: cannot join the Ray cluster (...)"


def test_a_local_cluster_that_fails_to_start_is_one_line(model, tmp_path, capsys, monkeypatch):
    """Ray answers a node that cannot start (full /tmp, a file-size limit) with a bare Exception after its
    start-up timeout: one line saying where Ray's logs are, not a traceback."""
    import ray

    def fail(**_):
        raise Exception("The current node timed out during startup. This could happen because some of the Ray "
                        "processes failed to startup.")

    monkeypatch.setattr(ray, "init", fail)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    code = train_main(["--hf-checkpoint", str(model), "--rm-type", "deepscaler", "--rollout-batch-size", "4",
                       "--n-samples-per-prompt", "2", "--num-rollout", "1", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "plugrl train: error: could not start a local Ray cluster (Exception: The current node timed out during "
        "startup.")
    assert "/tmp/ray/session_latest/logs" in err
