"""A patched PEFT model trained under torch.distributed on CPU (gloo, 2 processes): the LoRA gradients
equal the single-process ones. DDP always; FSDP2 (fully_shard) as well where this torch supports it on CPU."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft", reason="needs peft (in the test extras)")
pytest.importorskip("transformers", reason="needs transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this torch build", allow_module_level=True)

WORLD = 2


def _model():
    from peftkern.integrations.peft import patch

    from .test_peft_integration import lora_model

    model = lora_model(seed=0)
    assert patch(model) > 0
    return model


def _batch():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 128, (4, 16), generator=g)


def _lora_grads(model):
    return {n.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1): p.grad.detach().clone()
            for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def _worker(rank, init_file, out_file, mode):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        ids = _batch()[rank::WORLD]
        wrapped(input_ids=ids, labels=ids).loss.backward()
        grads = _lora_grads(model)
        if mode == "fsdp2":  # sharded gradients: gather the full tensors
            grads = {n: (g.full_tensor() if hasattr(g, "full_tensor") else g) for n, g in grads.items()}
        if rank == 0:
            torch.save(grads, out_file)
        # full_tensor() all-gathers may still be in flight on ranks that never read their result; a
        # barrier (ordered after them on the same group) completes them before the group is torn down,
        # which otherwise can abort the process
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _distributed_grads(tmp_path, mode):
    out = tmp_path / f"{mode}.pt"
    mp.spawn(_worker, args=(str(tmp_path / f"{mode}.init"), str(out), mode), nprocs=WORLD, join=True)
    return torch.load(out)


def _single_process_grads():
    model = _model()
    ids = _batch()
    model(input_ids=ids, labels=ids).loss.backward()
    return _lora_grads(model)


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    expected = _single_process_grads()
    got = _distributed_grads(tmp_path, "ddp")
    assert got.keys() == expected.keys() and got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp2_fully_shard_gloo_two_processes_match_single_process(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    expected = _single_process_grads()
    got = _distributed_grads(tmp_path, "fsdp2")
    assert got.keys() == expected.keys() and got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
