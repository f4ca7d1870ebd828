"""The verl row of bench/bench_ppo_step.py (bench/bench_ppo_verl.py) on the tiny model, on
a CPU: the row through the benchmark's own command line (a warm-up and a measured step in
its worker process), what verl's workers compute against the checkpoint's own log-probs in
float64 and what one step changes (in a process of its own: the run sets verl's platform
and a process group), the step's KL penalty and GAE against a float64 oracle (verl's
workers replaced by stand-ins answering given log-probs and values), and the harness's
rollout batch and configuration."""

import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from bench import bench_ppo_verl as bv
from bench.bench_grpo_step import synthetic_tokenizer, varied_reward
from bench.bench_ppo_step import main

REPO = Path(__file__).resolve().parents[2]
FASTRL_ROW_FIELDS = {"seconds_per_step", "generate_seconds_per_step", "tokens_per_second",
                     "peak_allocated_gib", "peak_reserved_gib", "peak_rss_gib", "steps",
                     "last_log"}  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


def test_the_verl_row_measures_a_ppo_step(tmp_path, cache_dir):
    out = tmp_path / "ppo_step.json"
    main(["--models", "tiny", "--trainers", "verl", "--device", "cpu", "--steps", "1",
          "--warmup", "1", "--rollout-size", "2", "--prompt-length", "4",
          "--completion-length", "3", "--verl-python", sys.executable,
          "--cache-dir", str(cache_dir), "--out", str(out)])  # fmt: skip
    (row,) = json.loads(out.read_text())["results"]
    assert "error" not in row, row.get("stderr_tail")
    assert row["trainer"] == "verl" and row["python"] == sys.executable
    assert set(row) >= FASTRL_ROW_FIELDS
    assert len(row["steps"]) == 2  # the warm-up and the measured step
    assert 0 < row["generate_seconds_per_step"] < row["seconds_per_step"]
    assert row["tokens_per_second"] == pytest.approx(2 * (4 + 3) / row["seconds_per_step"])
    assert row["peak_allocated_gib"] is None and row["peak_rss_gib"] > 0  # CPU: host memory
    log = row["last_log"]
    assert set(log) == {"loss", "actor/pg_loss", "critic/vf_loss", "actor/reward_kl_penalty"}
    assert all(math.isfinite(v) for v in log.values())
    assert log["critic/vf_loss"] > 0  # random critic, rewards 0..6
    assert row["versions"]["verl"] == "0.9.1"


_CHECK = """
import json, sys
from argparse import Namespace
import torch
from transformers import AutoModelForCausalLM
from bench import bench_ppo_verl as bv
from bench.bench_grpo_step import prepare_run

opts = Namespace(**json.loads(sys.argv[1]))
bv.import_verl(); bv._use_cpu_platform(); bv._init_process_group(False)
path, tok, prompts = prepare_run(opts, opts.rollout_size)
cfg = bv.verl_config(opts, path, cuda=False)
actor, critic = bv.build_workers(cfg, opts.attn_implementation)
tok.padding_side = "left"
enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
torch.manual_seed(0)
seq = bv.generate(actor, enc["input_ids"], enc["attention_mask"], opts.completion_length, tok, None)
batch, scores = bv.rollout_batch(enc["input_ids"], enc["attention_mask"], seq, prompts, tok)
old = bv._infer(actor.compute_log_prob, batch, "log_probs", "old_log_probs", calculate_entropy=True)
ref = bv._infer(actor.compute_log_prob, batch, "log_probs", "ref_log_prob",
                calculate_entropy=False, no_lora_adapter=True)
values = bv._infer(critic.infer_batch, batch, "values", "values")
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
with torch.no_grad():
    logits = model(input_ids=seq, attention_mask=batch.batch["attention_mask"],
                   position_ids=batch.batch["position_ids"]).logits
P = enc["input_ids"].shape[1]
want = torch.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, seq[:, P:, None])[..., 0]

def params(worker, lora):
    return {n: p.detach().full_tensor().clone() for n, p in worker.engine.module.named_parameters()
            if ("lora_" in n) == lora}

before = [params(actor.actor, True), params(actor.actor, False), params(critic, False)]
from verl.trainer.ppo.core_algos import get_kl_controller
metrics = bv.ppo_step(actor, critic, cfg, get_kl_controller(cfg.algorithm.kl_ctrl), batch, scores)
after = [params(actor.actor, True), params(actor.actor, False), params(critic, False)]
changed = [sorted(n for n in b if not torch.equal(b[n], a[n])) for b, a in zip(before, after)]
print("CHECK " + json.dumps(dict(
    ref_err=(ref.batch["ref_log_prob"].double() - want).abs().max().item(),
    old_minus_ref=(old.batch["old_log_probs"] - ref.batch["ref_log_prob"]).abs().max().item(),
    values_shape=list(values.batch["values"].shape), n_lora=len(before[0]),
    changed=[len(c) for c in changed], lora_b_changed=sum(".lora_B." in n for n in changed[0]),
    n_critic=len(before[2]), metrics=metrics,
)))
"""


def test_verl_workers_give_the_checkpoints_log_probs_and_train_the_adapters(cache_dir):
    opts = dict(models="tiny", cache_dir=str(cache_dir), max_memory_gb=0, rollout_size=3,
                prompt_length=5, completion_length=3, kl_coef=0.05,
                attn_implementation="sdpa")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(opts)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("CHECK ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    check = json.loads(lines[-1][len("CHECK ") :])
    # the reference (adapters off) is the checkpoint; fp32 against float64
    assert check["ref_err"] < 1e-5
    # LoRA's B starts at 0: the policy starts as the reference
    assert check["old_minus_ref"] < 1e-6
    assert check["values_shape"] == [3, 3]
    # the actor trains its adapters only (2 layers x 7 linears x A, B): the first step
    # moves every B (from 0), not A, whose gradient is 0 while B is (and whose weight
    # decay, lr x 0.01 = 1e-8, rounds away in fp32); the critic trains all its weights
    assert check["n_lora"] == 2 * 7 * 2
    assert check["changed"][0] == check["lora_b_changed"] == 2 * 7
    assert check["changed"][1] == 0
    assert check["changed"][2] == check["n_critic"]
    assert all(math.isfinite(v) for v in check["metrics"].values())


# ------------------------------------------------------------------ the harness


def test_rollout_batch_masks_after_eos_and_scores_the_last_token():
    tok = synthetic_tokenizer(40)  # pad 0, bos 1, eos 2
    prompt_ids = torch.tensor([[0, 7, 8], [5, 6, 9]])  # left-padded
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    responses = torch.tensor([[11, 2, 13, 14], [15, 16, 17, 18]])  # row 0 ends at its EOS
    seq = torch.cat([prompt_ids, responses], dim=1)
    prompts = ["w7 w8", "w5 w6 w9"]
    batch, scores = bv.rollout_batch(prompt_ids, prompt_mask, seq, prompts, tok)
    b = batch.batch
    assert b["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert b["position_ids"].tolist() == [[0, 0, 1, 2, 3, 3, 3], list(range(7))]
    assert torch.equal(b["input_ids"], seq) and torch.equal(b["responses"], responses)
    want = varied_reward(prompts, ["w11", "w15 w16 w17 w18"])
    assert scores.tolist() == [[0, want[0], 0, 0], [0, 0, 0, want[1]]]
    assert batch.meta_info["temperature"] == 1.0


def test_verl_config_is_verls_defaults_with_the_benchs_settings(tmp_path):
    from verl.utils.config import omega_conf_to_dataclass

    opts = Namespace(rollout_size=6, prompt_length=7, completion_length=5, kl_coef=0.03,
                     attn_implementation="eager")  # fmt: skip
    cfg = bv.verl_config(opts, tmp_path, cuda=False)
    model, actor = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor
    assert (model.lora_rank, model.lora_alpha, model.target_modules) == (16, 32, "all-linear")
    assert cfg.critic.model.lora_rank == 0 and cfg.critic.model.path == str(tmp_path)
    assert model.override_config.attn_implementation == "eager"
    assert actor.ppo_mini_batch_size == 6 and actor.ppo_epochs == 1
    assert actor.strategy == cfg.critic.strategy == "fsdp2"
    assert actor.fsdp_config.mixed_precision.param_dtype == "fp32"  # a CPU: fp32 compute
    assert cfg.algorithm.use_kl_in_reward and cfg.algorithm.kl_ctrl.kl_coef == 0.03
    assert cfg.algorithm.adv_estimator == "gae" and actor.loss_agg_mode == "token-mean"
    # verl's own defaults, untouched
    assert actor.optim.lr == 1e-6 and cfg.critic.optim.lr == 1e-5 and actor.clip_ratio == 0.2
    assert omega_conf_to_dataclass(actor).ppo_mini_batch_size == 6  # verl accepts it
    on_gpu = bv.verl_config(opts, tmp_path, cuda=True).actor_rollout_ref.actor.fsdp_config
    assert "mixed_precision" not in on_gpu and on_gpu.use_torch_compile  # verl's bf16


class _FakeWorkers:
    """verl's actor and critic workers as `ppo_step` calls them, answering given per-token
    figures ([B, R]) in verl's layout (flat over the nested sequences, shifted one token
    left) and keeping what the updates were given."""

    def __init__(self, old, ref, values):
        self.answers = {False: old, True: ref, "values": values}
        self.updates = {}

    @staticmethod
    def _flat(td, per_response):
        from tensordict import TensorDict

        ends = td["input_ids"].offsets()[1:]
        lens = td["response_mask"].sum(-1)
        flat = torch.zeros(int(ends[-1]))
        for b, (end, n) in enumerate(zip(ends.tolist(), lens.tolist(), strict=True)):
            flat[end - n - 1 : end - 1] = per_response[b, :n]
        return TensorDict({"log_probs": flat, "values": flat}, batch_size=[])

    def compute_log_prob(self, td):
        from verl.utils import tensordict_utils as tu

        return self._flat(td, self.answers[tu.get(td, "no_lora_adapter", default=False)])

    def infer_batch(self, td):
        return self._flat(td, self.answers["values"])

    def _update(self, role, td, loss):
        from verl.utils import tensordict_utils as tu

        self.updates[role] = td
        metrics = {"loss": [loss], "actor/pg_loss": [loss], "critic/vf_loss": [loss]}
        return tu.get_tensordict({}, non_tensor_dict={"metrics": metrics})

    def train_mini_batch(self, td):
        return self._update("critic", td, 2.0)

    def update_actor(self, td):
        return self._update("actor", td, 3.0)


def test_ppo_step_wires_verls_kl_penalty_and_gae_as_its_trainer_does(tmp_path):
    from verl.trainer.ppo.core_algos import get_kl_controller

    bv.import_verl()
    tok = synthetic_tokenizer(40)
    prompt_ids = torch.tensor([[0, 7, 8], [5, 6, 9], [4, 4, 4]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    responses = torch.tensor([[11, 2, 13, 14], [15, 16, 17, 18], [19, 20, 2, 21]])
    seq = torch.cat([prompt_ids, responses], dim=1)
    prompts = ["w7 w8", "w5 w6 w9", "w4 w4 w4"]
    batch, scores = bv.rollout_batch(prompt_ids, prompt_mask, seq, prompts, tok)
    g = torch.Generator().manual_seed(0)
    old, ref, values = (torch.randn(3, 4, generator=g) for _ in range(3))
    workers = _FakeWorkers(old, ref, values)
    opts = Namespace(rollout_size=3, prompt_length=3, completion_length=4, kl_coef=0.3,
                     attn_implementation="sdpa")  # fmt: skip
    cfg = bv.verl_config(opts, tmp_path, cuda=False)
    metrics = bv.ppo_step(workers, workers, cfg, get_kl_controller(cfg.algorithm.kl_ctrl),
                          batch, scores)  # fmt: skip

    # the oracle, float64: k1 KL in the rewards, gamma = lambda = 1 GAE (the return is the
    # rest of the response's rewards), advantages whitened over the response tokens
    mask = batch.batch["response_mask"].double()
    kld = (old.double() - ref.double()) * mask
    rewards = scores.double() - 0.3 * kld
    returns = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    adv = (returns - values.double())[mask.bool()]
    adv = (adv - adv.mean()) / adv.var().sqrt()  # unbiased, as verl's masked_whiten
    critic, actor = workers.updates["critic"], workers.updates["actor"]
    valid = mask.bool()
    fp32 = dict(rtol=1e-5, atol=1e-6)  # verl's float32 against float64
    torch.testing.assert_close(critic["returns"][valid].double(), returns[valid], **fp32)
    torch.testing.assert_close(critic["values"][valid], values[valid])
    torch.testing.assert_close(actor["advantages"][valid].double(), adv, **fp32)
    torch.testing.assert_close(actor["old_log_probs"][valid], old[valid])
    torch.testing.assert_close(actor["ref_log_prob"][valid], ref[valid])
    want_kl = ((kld.sum(-1) / mask.sum(-1)).mean()).item()
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(want_kl, rel=1e-6)
    assert (metrics["loss"], metrics["critic/vf_loss"]) == (3.0, 2.0)
