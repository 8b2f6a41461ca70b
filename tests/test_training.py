"""Training the ways users train: the Hugging Face Trainer, gradient checkpointing, autocast,
torch.compile of a whole model, and DistributedDataParallel (gloo, two CPU processes)."""

import copy

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import fastlora
from tiny_models import TARGETS, batch, init_lora_B, lora_grads, peft_model, tiny_llama


def fastlora_twin(peft_twin, tmp_path) -> torch.nn.Module:
    """A fresh tiny Llama carrying peft_twin's adapter (the same weights) through fastlora."""
    peft_twin.save_pretrained(tmp_path)
    return fastlora.load_adapter(tiny_llama(), tmp_path)


def injected_llama(lora_dropout: float = 0.0) -> torch.nn.Module:
    return init_lora_B(fastlora.inject(tiny_llama(), TARGETS, r=4, lora_alpha=8, lora_dropout=lora_dropout))


def sequences(count: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 97, (count, 12), generator=torch.Generator().manual_seed(seed))


def train_with_trainer(model: torch.nn.Module, output_dir) -> list[float]:
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": ids, "labels": ids} for ids in sequences(8)]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_hf_trainer_trains_like_peft(tmp_path):
    theirs = peft_model(tiny_llama(), TARGETS)
    ours = fastlora_twin(theirs, tmp_path / "adapter")
    frozen = {n: p.clone() for n, p in ours.named_parameters() if "lora_" not in n}
    loss_theirs = train_with_trainer(theirs, tmp_path / "peft")
    loss_ours = train_with_trainer(ours, tmp_path / "fastlora")
    assert len(loss_ours) == 4
    torch.testing.assert_close(torch.tensor(loss_ours), torch.tensor(loss_theirs), rtol=1e-4, atol=1e-4)
    trained = dict(ours.named_parameters())
    assert all(torch.equal(trained[n], p) for n, p in frozen.items())
    theirs_state = {k.removeprefix("base_model.model.").replace(".default", ""): v
                    for k, v in theirs.state_dict().items() if "lora_" in k}
    ours_state = {k + ".weight" if not k.endswith(".weight") else k: v
                  for k, v in fastlora.lora_state_dict(ours).items()}
    assert ours_state.keys() == theirs_state.keys()
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-4, atol=1e-5)


def loss_and_grads(model: torch.nn.Module, seed: int = 5, run=None) -> tuple[torch.Tensor, dict]:
    """The loss of ``run`` (default: the model itself) and the model's LoRA gradients."""
    model.zero_grad()
    torch.manual_seed(seed)
    loss = (model if run is None else run)(**batch()).loss
    loss.backward()
    return loss.detach(), {k: g.clone() for k, g in lora_grads(model).items()}


def test_gradient_checkpointing_replays_the_dropout_mask():
    model = injected_llama(lora_dropout=0.3).train()
    loss, grads = loss_and_grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, grads_ckpt = loss_and_grads(model)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == 12
    for key in grads:
        torch.testing.assert_close(grads_ckpt[key], grads[key])


def test_autocast_bf16_is_as_accurate_as_peft(tmp_path):
    theirs = peft_model(tiny_llama(), TARGETS)
    ours = fastlora_twin(theirs, tmp_path)
    truth_loss, truth_grads = loss_and_grads(ours)
    errors = {}
    for name, model in (("peft", theirs), ("fastlora", ours)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grads = loss_and_grads(model)
        assert all(g.dtype == torch.float32 for g in grads.values())
        errors[name] = [(loss - truth_loss).abs().item()]
        errors[name] += [((grads[k] - truth_grads[k]).abs().max() / truth_grads[k].abs().max()).item() for k in sorted(grads)]
    for ours_error, peft_error in zip(errors["fastlora"], errors["peft"]):
        assert ours_error <= 2 * peft_error + 1e-3, (errors["fastlora"], errors["peft"])


def test_torch_compile_of_a_whole_model_matches_eager():
    model = injected_llama()
    loss, grads = loss_and_grads(model)
    loss_compiled, grads_compiled = loss_and_grads(model, run=torch.compile(model))
    torch.testing.assert_close(loss_compiled, loss, rtol=1e-5, atol=1e-5)
    for key in grads:
        torch.testing.assert_close(grads_compiled[key], grads[key], rtol=1e-4, atol=1e-5)


DDP_STEPS = 3


def sgd_steps(model: torch.nn.Module, ids: torch.Tensor) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


def ddp_worker(rank: int, world_size: int, store: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    model = injected_llama().train()
    sgd_steps(DistributedDataParallel(model), sequences(4)[rank::world_size])
    if rank == 0:
        torch.save(fastlora.lora_state_dict(model), result)
    dist.destroy_process_group()


def test_ddp_two_processes_train_the_same_adapter_as_one(tmp_path):
    result = tmp_path / "adapter.pt"
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "store"), str(result)), nprocs=2, join=True)
    distributed = torch.load(result)
    single = injected_llama().train()
    start = copy.deepcopy(fastlora.lora_state_dict(single))
    sgd_steps(single, sequences(4))
    expected = fastlora.lora_state_dict(single)
    assert distributed.keys() == expected.keys() and len(expected) == 12
    for key, value in expected.items():
        assert not torch.equal(value, start[key])
        torch.testing.assert_close(distributed[key], value, rtol=1e-4, atol=1e-6)


def adapter_trainer_run(output_dir, max_steps: int, resume: str | None = None):
    from transformers import TrainerCallback, TrainingArguments

    from fastlora.training import AdapterTrainer

    class CountSteps(TrainerCallback):
        taken = 0

        def on_step_end(self, args, state, control, **kwargs):
            CountSteps.taken += 1

    model = injected_llama(lora_dropout=0.1).train()
    data = [{"input_ids": ids, "labels": ids} for ids in sequences(12)]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="linear", warmup_steps=1, logging_steps=1, save_strategy="steps", save_steps=3,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    AdapterTrainer(model=model, args=args, train_dataset=data, callbacks=[CountSteps()]).train(
        resume_from_checkpoint=resume)
    return model, CountSteps.taken


def test_adapter_trainer_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    whole, steps = adapter_trainer_run(tmp_path / "whole", max_steps=6)
    assert steps == 6
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # no base weights in a checkpoint
    assert (checkpoint / "adapter_model.safetensors").stat().st_size < 64 * 1024
    resumed, steps = adapter_trainer_run(tmp_path / "resumed", max_steps=6, resume=str(checkpoint))
    assert steps == 3  # it went on from step 3
    expected, got = fastlora.lora_state_dict(whole), fastlora.lora_state_dict(resumed)
    assert expected.keys() == got.keys() and len(expected) == 12
    start = fastlora.lora_state_dict(injected_llama())
    for key, value in expected.items():
        assert not torch.equal(value, start[key])
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
