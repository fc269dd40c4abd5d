"""bench/train_step.py --host-reads: the recipe's step reads no tensor value on the host but from the batch's host
copy. On a GPU every such read of a device tensor (`.item()`, a tensor in an `if`) makes the host wait for the GPU
to catch up, once per step."""

from __future__ import annotations


def test_the_recipes_step_reads_values_only_from_the_batchs_host_copy(load_bench):
    bench = load_bench("train_step")
    reads = bench.host_reads(steps=2, rows=64)
    # the tracer sees reads: Transformers' own check whether any token is padded, once per forward
    assert any(place.startswith("transformers/masking_utils.py") for place, _ in reads), reads
    ours = sorted(code.split("  #")[0] for place, code in reads if place.startswith("lorafit/"))
    assert ours == [
        # the frozen-prefix cache gathers its host-held states by the batch's row numbers; train_step has moved
        # `index` to the device with the rest of the batch, so on a GPU this read waits (docs/gpu.md, leads)
        "for r, i in enumerate(index.tolist()):",
        # train_step's counters, on `labels` and `mask` taken from the batch before it goes to the device
        "st.real_tokens += int(mask.sum())",
        "st.seen += int((labels >= 0).sum())"], reads
