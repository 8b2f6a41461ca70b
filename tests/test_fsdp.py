"""FSDP1 (use_orig_params=True) and FSDP2 (fully_shard) train an injected model on two gloo
processes on a CPU: after a few SGD steps the adapter equals a one-process run on the whole
batch, the frozen weight (FSDP1 hands it over as a view that requires grad) is treated as
frozen, and the adapter saved from the sharded model (a full state dict gathered on rank 0,
then PEFT's files) loads into a fresh model with the same weights."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastlora
from test_training import injected_llama, sequences, sgd_steps
from tiny_models import tiny_llama


def shard(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def fsdp_worker(rank: int, world_size: int, store: str, kind: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    reference_calls = []
    real_reference = fastlora.reference.lora_linear
    fastlora.reference.lora_linear = lambda *args, **kwargs: reference_calls.append(1) or real_reference(*args, **kwargs)
    sharded = shard(injected_llama().train(), kind)
    sgd_steps(sharded, sequences(4)[rank::world_size])
    # the frozen weight reached every layer as frozen: the fused op ran, never the plain-autograd dW path
    assert reference_calls == [], f"{kind}: {len(reference_calls)} calls fell back to the reference math"
    # the recipe of the README: gather a full state dict, save the adapter from an unsharded copy on rank 0
    # (cpu_offload=True, for GPU runs, crashes FSDP1 on a CPU-only gloo group: the tensors are on the CPU already)
    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        unsharded = injected_llama()
        unsharded.load_state_dict(state)
        fastlora.save_adapter(unsharded, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_fsdp_two_processes_train_and_save_the_same_adapter_as_one(tmp_path, kind):
    out = tmp_path / "adapter"
    mp.spawn(fsdp_worker, args=(2, str(tmp_path / "store"), kind, str(out)), nprocs=2, join=True)
    single = injected_llama().train()
    sgd_steps(single, sequences(4))
    expected = fastlora.lora_state_dict(single)
    loaded = fastlora.lora_state_dict(fastlora.load_adapter(tiny_llama(), out))
    assert loaded.keys() == expected.keys() and len(expected) == 12
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=1e-4, atol=1e-6)
