"""eval.py --tasks agrees with lm-evaluation-harness item by item: the harness's `hf` model on an
exported PolyNorm checkpoint (remote code, the exported tokenizer), offline, on a local JSONL task
given by a task YAML, gives every choice's log-likelihood and the same acc / acc_norm.

Both sides are float32 (JAX on one side, PyTorch on the other): log-likelihoods of a few tokens
agree to 1e-4 absolute. Choices include non-ASCII words, where acc_norm by characters (the
harness's and eval.py's default) and by bytes divide differently."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polycom_jax import checkpoint as ckpt_lib
from polycom_jax import downstream, interop
from polycom_jax import setup as setup_lib

pytest.importorskip("lm_eval")
pytest.importorskip("torch")

ITEMS = [
    {"context": "France's capital is", "choices": ["Paris", "Berlin", "Rome"], "gold": 0},
    {"context": "Dessert:", "choices": ["crème brûlée", "bread", "soup"], "gold": 0},
    {"context": "Naive, also", "choices": ["naïve", "nave", "knave"], "gold": 0},
    {"context": "In a bar, a", "choices": ["café", "cafe au lait", "tea"], "gold": 1},
    {"context": "def f(a, b): return", "choices": ["a + b", "a - b", "None", "b"], "gold": 0},
    {"context": "Japan in Japanese:", "choices": ["日本", "Nihon", "Japan"], "gold": 0},
    {"context": "Two plus two makes", "choices": ["four", "five"], "gold": 0},
    {"context": "Über alles,", "choices": ["Straße", "street", "road"], "gold": 2},
]
TASK_YAML = """task: polycom_agreement
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus_glob, data_dir):
  """(config, workdir, hf_dir) of a step-1 checkpoint of a tiny PolyNorm model with random
  weights (std 0.2: the choices' log-likelihoods differ) and its export."""
  from conftest import tiny_config
  config = tiny_config(corpus_glob, data_dir)
  config.model.activation = "polynorm"
  s = setup_lib.setup(config)
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda a: jnp.asarray((a.ndim == 1) + rng.normal(0.0, 0.2, a.shape),
                                              a.dtype), s.abstract_state["params"])
  workdir = str(tmp_path_factory.mktemp("run"))
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  checkpointer.save(1, {"step": jnp.int32(1), "params": params, "opt_state": s.tx.init(params)},
                    {}, setup_lib.config_as_dict(config), force=True)
  checkpointer.close()
  hf_dir = str(tmp_path_factory.mktemp("hf"))
  interop.export_checkpoint(config, workdir, hf_dir)
  return config, workdir, hf_dir


# Both conventions in one interpreter (one import of torch, transformers and the harness).
HARNESS = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
hf_dir, task_dir, out = sys.argv[1:]
manager, result = TaskManager(include_path=task_dir), {}
for name, add_bos in (("default", None), ("no_bos", False)):
  args = {"pretrained": hf_dir, "dtype": "float32", "trust_remote_code": True}
  if add_bos is not None:
    args["add_bos_token"] = add_bos
  r = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=["polycom_agreement"],
                              task_manager=manager, device="cpu", batch_size=4, log_samples=True)
  result[name] = sorted(({k: d[k] for k in ("doc_id", "doc", "filtered_resps", "acc", "acc_norm")}
                         for d in r["samples"]["polycom_agreement"]), key=lambda d: d["doc_id"])
with open(out, "w") as f:
  json.dump(result, f, default=list)
"""


@pytest.fixture(scope="module")
def harness(exported, tmp_path_factory):
  """(items path, {"default": docs, "no_bos": docs}): the harness's per-document samples on the
  export, run offline in a subprocess with its own HF_HOME."""
  _, _, hf_dir = exported
  root = tmp_path_factory.mktemp("harness")
  path = root / "items.jsonl"
  path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in ITEMS),
                  encoding="utf-8")
  (root / "tasks").mkdir()
  (root / "tasks" / "polycom_agreement.yaml").write_text(TASK_YAML.format(path=path))
  env = dict(os.environ, HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  out = root / "samples.json"
  proc = subprocess.run([sys.executable, "-c", HARNESS, hf_dir, str(root / "tasks"), str(out)],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return path, json.loads(out.read_text())


@pytest.mark.parametrize("start_token,convention", [("eos", "default"), ("none", "no_bos")])
def test_eval_tasks_agree_with_lm_eval_item_by_item(exported, harness, tmp_path, start_token,
                                                    convention):
  """The harness's default on the export (its tokenizer puts EOS first) is eval.py's default
  start_token="eos"; add_bos_token=False is start_token="none"."""
  config, workdir, _ = exported
  path, samples = harness
  docs = samples[convention]
  config = config.copy_and_resolve_references()
  config.eval.start_token = start_token
  tasks = downstream.load_tasks(f"agreement={path}", str(tmp_path))
  ours = downstream.evaluate_checkpoint(config, workdir, 1, tasks)["tasks"]["agreement"]

  # Both sides see whole requests (eval.py cuts at data.seq_len, the harness at max_length).
  assert len(docs) == len(ITEMS) == ours["n"] and ours["truncated_requests"] == 0
  for doc, mine in zip(docs, ours["loglikelihoods"]):
    theirs = [float(r[0]) for r in doc["filtered_resps"]]
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4, err_msg=str(doc["doc"]))
    assert doc["acc"] == float(np.argmax(mine) == doc["doc"]["gold"])
  lengths = [np.array([len(c) for c in item["choices"]]) for item in ITEMS]
  assert np.mean([d["acc"] for d in docs]) == ours["acc"]
  assert np.mean([d["acc_norm"] for d in docs]) == ours["acc_norm"] == np.mean(
      [np.argmax(np.array(ll) / n) == item["gold"]
       for ll, n, item in zip(ours["loglikelihoods"], lengths, ITEMS)])
  assert len(set(map(tuple, ours["loglikelihoods"]))) == len(ITEMS)   # not all one value
  other = samples["no_bos" if convention == "default" else "default"]
  assert not np.allclose([float(r[0]) for d in other for r in d["filtered_resps"]],
                         [v for ll in ours["loglikelihoods"] for v in ll], atol=1e-3)
