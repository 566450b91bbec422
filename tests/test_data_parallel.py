"""Data parallelism (api.md §6): two gloo ranks on loopback, each with half of every global
batch, must end with the parameters of one process that trains on the whole global batches, when
the loss is divided by ``num_items_in_batch`` summed across ranks (and multiplied by the world
size, since DDP averages the gradients).

Each run is a forked process (a clean process state: no process group, no accelerate
singletons); rank 0 and the single process save their parameters for the test to compare.
Labels carry -100 in different amounts on each rank, so a per-rank count would give other
parameters. SGD, so that the parameters compare the gradients of every step."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist

import kdfast

from _gloo import fork, free_port

pytestmark = pytest.mark.distributed

WORLD = 2
VOCAB, SEQ, B = 40, 7, 2  # B: the per-rank micro-batch; the global one is WORLD * B
STEPS, ACCUM = 3, 2
LR = 0.5


def _data(seed=0):
    """``STEPS * ACCUM`` global micro-batches of ``WORLD * B`` sequences, in order; labels in
    the Hugging Face convention (``labels == input_ids``), masked unevenly across the halves."""
    g = torch.Generator().manual_seed(seed)
    n = STEPS * ACCUM * WORLD * B
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = ids.clone()
    for i in range(n):
        # the first half of each global micro-batch (rank 0's) is masked far more than the second
        masked = int(torch.randint(3, SEQ, (), generator=g)) if (i // B) % 2 == 0 else i % 2
        labels[i, SEQ - masked:] = -100
    return ids, labels


def _reported(target, nprocs, out, *args):
    """Runs ``target(rank, out, *args)`` in forked processes that write their tracebacks to
    ``out/rank{r}.txt``, and fails with them."""
    codes = fork(_guarded, nprocs, target, str(out), *args)
    reports = [(out / f"rank{r}.txt").read_text() if (out / f"rank{r}.txt").exists() else "no report"
               for r in range(nprocs)]
    assert reports == [""] * nprocs and codes == [0] * nprocs, (codes, "\n".join(reports))


def _guarded(rank, target, out, *args):
    torch.set_num_threads(1)
    error = ""
    try:
        target(rank, out, *args)
    except BaseException:  # noqa: BLE001 - reported to the test process
        error = traceback.format_exc()
    finally:
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(error)


# ----------------------------------------------------------------------------- a plain loop


class _TinyLM(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def _plain_loop(model, params, rank, world, step_fn=None):
    """SGD for STEPS steps of ACCUM micro-batches; ``rank`` of ``world`` takes its share of
    every global micro-batch. The loss is the micro-batch's share of the window's token mean,
    times ``world`` (the data-parallel wrapper averages gradients over ranks)."""
    teacher = _TinyLM(seed=1).eval()
    ids, labels = _data()
    aligned = torch.cat([labels[:, 1:], torch.full((len(labels), 1), -100)], 1)
    opt = torch.optim.SGD(params, lr=LR)
    per = WORLD * B // world
    for step in range(STEPS):
        window = range(step * ACCUM, (step + 1) * ACCUM)
        count = sum(int(aligned[m * WORLD * B:(m + 1) * WORLD * B].ne(-100).sum()) for m in window)
        for m in window:
            rows = slice(m * WORLD * B + rank * per, m * WORLD * B + (rank + 1) * per)
            with torch.no_grad():
                t = teacher(ids[rows])
            s = model(ids[rows])
            loss = kdfast.forward_kl(s.reshape(-1, VOCAB), t.reshape(-1, VOCAB), labels=aligned[rows].reshape(-1),
                                     num_items_in_batch=count) * world
            last = m == window[-1]
            if step_fn is not None and not last:
                with step_fn():
                    loss.backward()
            else:
                loss.backward()
        opt.step()
        opt.zero_grad()


def _plain_single(rank, out):
    model = _TinyLM(seed=0)
    _plain_loop(model, model.parameters(), 0, 1)
    torch.save(model.state_dict(), os.path.join(out, "single.pt"))


def _plain_ddp(rank, out, port, wrap):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _TinyLM(seed=0)
        if wrap == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
            _plain_loop(wrapped, wrapped.parameters(), rank, WORLD, step_fn=wrapped.no_sync)
            state = model.state_dict()
        else:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model)
            _plain_loop(model, model.parameters(), rank, WORLD)
            state = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, os.path.join(out, f"{wrap}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_same_params(got, want):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


def _plain_case(tmp_path, wrap):
    _reported(_plain_single, 1, tmp_path)
    _reported(_plain_ddp, WORLD, tmp_path, free_port(), wrap)
    want = torch.load(tmp_path / "single.pt")
    got = torch.load(tmp_path / f"{wrap}.pt")
    _assert_same_params(got, want)
    init = _TinyLM(seed=0).state_dict()
    assert not torch.allclose(want["head.weight"], init["head.weight"])  # it did train


def test_ddp_loop_equals_one_process_with_the_global_batch(tmp_path):
    _plain_case(tmp_path, "ddp")


def _fsdp2_on_cpu():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard: {exc}"
    return None


@pytest.mark.skipif(_fsdp2_on_cpu() is not None, reason=str(_fsdp2_on_cpu()))
def test_fsdp2_loop_equals_one_process_with_the_global_batch(tmp_path):
    _plain_case(tmp_path, "fsdp2")


# ----------------------------------------------------------------------------- the Trainer


def _gpt2(n_layer, seed, init=0.02):
    """A tiny GPT-2: its head is tied to the input embeddings."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=init,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(seed):
    """A tiny Llama with an untied head (a parameter that only the fused loss reaches)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


STUDENTS = {"gpt2": lambda: _gpt2(1, seed=0), "llama": lambda: _llama(seed=0)}


class _Items(torch.utils.data.Dataset):
    def __init__(self):
        self.ids, self.labels = _data()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _trainer_run(rank, out, world, port, student_name, fused):
    """One process of a run: rank ``rank`` of ``world`` (the environment torchrun gives it)."""
    import transformers
    from accelerate.state import AcceleratorState, PartialState
    from kdfast.integrations.transformers import DistillationTrainer

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          OMP_NUM_THREADS="1")  # else accelerate sets it, with a UserWarning
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a process that may hold one
    PartialState._reset_state()
    transformers.utils.logging.disable_progress_bar()
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, f"run{world}"), use_cpu=True, ddp_backend="gloo" if world > 1 else None,
        per_device_train_batch_size=WORLD * B // world, gradient_accumulation_steps=ACCUM, max_steps=STEPS,
        learning_rate=LR, lr_scheduler_type="constant", optim="sgd", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", seed=0,
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, report_to=[],
    )
    student = STUDENTS[student_name]()
    trainer = DistillationTrainer(model=student, args=args, train_dataset=_Items(), data_collator=_collate,
                                  teacher_model=_gpt2(2, seed=1, init=0.3), fused=fused)
    assert trainer.args.world_size == world and trainer.args.average_tokens_across_devices
    assert trainer.fused == fused
    trainer.train()
    assert trainer.state.global_step == STEPS
    if rank == 0:
        torch.save(student.state_dict(), os.path.join(out, f"trainer{world}.pt"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.hf
@pytest.mark.parametrize("student_name, fused", [("gpt2", False), ("gpt2", True), ("llama", True)])
def test_distillation_trainer_ddp_equals_one_process_with_the_global_batch(tmp_path, student_name, fused):
    """torchrun's environment in each rank; the Trainer's own DDP wrapping (gloo, with
    ``find_unused_parameters=True``, its default) and accelerate's sharding of the batches:
    with the sequential sampler rank r takes batches r, r + 2, ..., so each global micro-batch
    is the single process's batch of twice the size."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _reported(_trainer_run, 1, tmp_path, 1, 0, student_name, fused)
    _reported(_trainer_run, WORLD, tmp_path, WORLD, free_port(), student_name, fused)
    want = torch.load(tmp_path / "trainer1.pt")
    got = torch.load(tmp_path / f"trainer{WORLD}.pt")
    _assert_same_params(got, want)
    init = STUDENTS[student_name]().state_dict()
    assert not torch.allclose(want["lm_head.weight"], init["lm_head.weight"])  # it did train
