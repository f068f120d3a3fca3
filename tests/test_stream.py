"""BatchStream: coverage, sharding, determinism, exact resume, values, CSR output, worker errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cellssl.loaders import CellStore, CellStoreError, InputError
from cellssl.loaders.sampler import BlockShuffleSampler
from cellssl.loaders.stream import BatchStream


def make_stream(store, split="train", seed=0, rank=0, world_size=1, drop_last=None, **kw) -> BatchStream:
    """A stream of 100-cell batches over blocks of 16 rows, shuffled in windows of 3 batches."""
    start, stop = (store if isinstance(store, CellStore) else CellStore(store)).split(split)
    drop = split == "train" if drop_last is None else drop_last
    sampler = BlockShuffleSampler(start, stop, 100, seed, rank, world_size, drop, block_size=16, buffer_batches=3)
    return BatchStream(store, split, sampler=sampler, **kw)


def expected_dense(store: CellStore, rows: np.ndarray, normalize=True) -> np.ndarray:
    dense = store.to_scipy()[rows].toarray().astype(np.float32)
    return np.log1p(dense / dense.sum(1, keepdims=True) * np.float32(1e4)) if normalize else dense


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_cell_once_per_epoch_across_ranks(synthetic_store, world):
    start, stop = CellStore(synthetic_store).split("train")
    seen, steps = [], set()
    for rank in range(world):
        stream = make_stream(synthetic_store, "train", rank=rank, world_size=world, drop_last=False)
        batches = list(stream)
        steps.add(len(batches))
        assert len(batches) == len(stream)
        seen.append(np.concatenate([b.index.numpy() for b in batches]))
    assert len(steps) == 1  # the same number of steps on every rank
    everything = np.concatenate(seen)
    assert len(everything) == stop - start and set(everything) == set(range(start, stop))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_training_shards_are_disjoint_full_batches(synthetic_store, world):
    shards = []
    for rank in range(world):
        stream = make_stream(synthetic_store, "train", rank=rank, world_size=world)
        batches = list(stream)
        assert len(batches) == len(stream) and all(len(b) == 100 for b in batches)
        shards.append(set(np.concatenate([b.index.numpy() for b in batches])))
    assert sum(len(s) for s in shards) == len(set().union(*shards))


def test_same_seed_same_batches_new_epoch_new_order(synthetic_store):
    a = [b.index.numpy().copy() for b in make_stream(synthetic_store, seed=3)]
    b = [b.index.numpy().copy() for b in make_stream(synthetic_store, seed=3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    stream = make_stream(synthetic_store, seed=3)
    stream.set_epoch(1)
    c = [b.index.numpy().copy() for b in stream]
    assert not np.array_equal(a[0], c[0])


def test_resume_mid_epoch_gives_the_remaining_batches(synthetic_store):
    stream = make_stream(synthetic_store, seed=5)
    stream.set_epoch(2)
    full = [(b.index.numpy().copy(), b.x.numpy().copy()) for b in stream]
    stream.set_epoch(2)
    it = iter(stream)
    for _ in range(4):
        next(it)
    state = stream.state_dict()
    it.close()
    assert state["epoch"] == 2 and state["step"] == 4
    resumed = make_stream(synthetic_store, seed=5)
    resumed.load_state_dict(state)
    rest = [(b.index.numpy().copy(), b.x.numpy().copy()) for b in resumed]
    assert len(rest) == len(full) - 4
    for (i1, x1), (i2, x2) in zip(full[4:], rest):
        assert np.array_equal(i1, i2) and np.array_equal(x1, x2)
    with pytest.raises(InputError, match="cannot resume the loader: the saved position has seed=5, this stream 6"):
        make_stream(synthetic_store, seed=6).load_state_dict(state)
    for bad in ({"step": len(resumed) + 1}, {"step": -1}, {"epoch": -2}, {"step": "3"}):
        with pytest.raises(InputError, match="position .* is outside"):
            make_stream(synthetic_store, seed=5).load_state_dict({**state, **bad})
    with pytest.raises(InputError, match="the saved position has store="):
        make_stream(synthetic_store, seed=5).load_state_dict({**state, "store": "another store"})


def test_ranks_with_an_empty_share_yield_nothing_and_others_everything(synthetic_store):
    store = CellStore(synthetic_store)
    start, stop = store.split("val")
    n = stop - start
    world = n + 3  # more ranks than cells: three shares are empty
    seen = []
    for rank in range(world):
        batches = list(BatchStream(store, "val", batch_size=4, rank=rank, world_size=world, drop_last=False,
                                   columns=[]))
        assert all(len(b) > 0 for b in batches)
        seen += [int(i) for b in batches for i in b.index]
    assert sorted(seen) == list(range(start, stop))


def test_endless_stream_crosses_epochs_and_resumes(synthetic_store):
    stream = make_stream(synthetic_store, seed=3)
    per_epoch = len(stream)
    taken = []
    for batch in stream.endless():
        taken.append((batch.epoch, batch.step))
        if len(taken) == per_epoch + 2:
            break
    assert taken[per_epoch - 1] == (0, per_epoch - 1) and taken[per_epoch:] == [(1, 0), (1, 1)]
    assert stream.state_dict()["epoch"] == 1 and stream.state_dict()["step"] == 2


@pytest.mark.parametrize("normalize", [True, False])
def test_dense_values_equal_store_rows(synthetic_store, normalize):
    store = CellStore(synthetic_store)
    for batch in make_stream(store, "val", normalize=normalize, drop_last=False):
        rows = batch.index.numpy()
        assert np.array_equal(batch.x.numpy(), expected_dense(store, rows, normalize))  # bitwise
        assert np.array_equal(batch.obs["cell_type"].numpy(), store.obs_codes("cell_type")[rows])
        names = make_stream(store, "val").categories["cell_type"]
        assert [names[c] for c in batch.obs["cell_type"]] == list(store.obs()["cell_type"].iloc[rows])


@pytest.mark.parametrize("normalize", [True, False])
def test_csr_output_densifies_to_the_same(synthetic_store, normalize):
    """CSR batches hold the store's rows: normalised on the host (what the CPU trainer reads), or raw counts that
    csr_to_dense normalises on the device (the GPU path), both equal to the dense batches."""
    from cellssl.kernels import csr_to_dense

    store = CellStore(synthetic_store)
    for batch in make_stream(store, "test", output="csr", drop_last=False, normalize=normalize):
        assert batch.x is None and batch.indices.dtype == torch.uint16  # the store's own index dtype
        dense = csr_to_dense(batch.indptr, batch.indices, batch.data, store.n_genes, None if normalize else 1e4)
        np.testing.assert_allclose(dense.numpy(), expected_dense(store, batch.index.numpy()), rtol=1e-6, atol=1e-6)


def test_position_after_a_batch_resumes_at_the_next(synthetic_store):
    """A consumer that reads one batch ahead (the CUDA feed) saves the position after the batch it trained."""
    stream = make_stream(synthetic_store, "train")
    it = stream.endless()
    trained, ahead = next(it), next(it)
    state = stream.state_after(trained)
    assert stream.state_dict()["step"] == ahead.step + 1 and state["step"] == trained.step + 1
    again = make_stream(synthetic_store, "train")
    again.load_state_dict(state)
    assert torch.equal(next(iter(again)).index, ahead.index)


def test_log1p_store_values_pass_through(tmp_path, synthetic_store):
    from cellssl.loaders.convert import convert, open_source
    from cellssl.loaders.synth import synth

    src = synth(tmp_path / "sctab", 400, "sctab-parquet", progress=False)
    store = convert(open_source("sctab", src), tmp_path / "s.cellstore", progress=False)
    start, stop = store.split("train")
    sampler = BlockShuffleSampler(start, stop, batch_size=64, block_size=8)
    batch = next(iter(BatchStream(store, "train", sampler=sampler)))
    assert np.array_equal(batch.x.numpy(), store.to_scipy()[batch.index.numpy()].toarray())


def test_ring_buffers_are_reused(synthetic_store):
    stream = make_stream(synthetic_store, prefetch=1)
    pointers = [b.x.data_ptr() for b in stream]
    assert len(set(pointers)) <= 1 + 2 + 1 < len(pointers)  # prefetch + held + the one being filled


@pytest.mark.parametrize("output", ["dense", "csr"])
def test_held_batches_stay_intact_while_more_are_read(synthetic_store, output):
    """A consumer that keeps `held` batches (gradient accumulation) finds them unchanged while the loader runs
    ahead into its ring."""
    kept = []
    for batch in make_stream(synthetic_store, held=3, output=output).endless():
        parts = (batch.x,) if output == "dense" else (batch.indptr, batch.indices, batch.data)
        kept.append((parts, [p.clone() for p in parts]))
        kept = kept[-3:]
        for views, copies in kept:
            assert all(torch.equal(v, c) for v, c in zip(views, copies))
        if batch.epoch == 2:
            break


def test_worker_errors_reach_the_consumer(synthetic_store, tmp_path):
    import shutil

    broken = tmp_path / "broken.cellstore"
    shutil.copytree(synthetic_store, broken)
    stream = make_stream(broken)
    shard = broken / "X" / "data" / "c" / "0"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CellStoreError, match="checksum mismatch"):
        list(stream)
    shard.unlink()
    with pytest.raises(CellStoreError, match="chunk file missing"):
        list(stream)


def test_bad_arguments(synthetic_store):
    with pytest.raises(InputError, match="--batch-size: 5000 exceeds the 1,200 cells .* use --batch-size 1200 or less"):
        BatchStream(synthetic_store, batch_size=5000)
    with pytest.raises(InputError, match="no obs column"):
        make_stream(synthetic_store, columns=["nope"])
    with pytest.raises(InputError, match="no 'holdout' split"):
        BatchStream(synthetic_store, split="holdout")
    with pytest.raises(ValueError, match="rank 2 outside"):
        make_stream(synthetic_store, rank=2, world_size=2)
    with pytest.raises(ValueError, match="output must be"):
        make_stream(synthetic_store, output="coo")
    start, stop = CellStore(synthetic_store).split("train")
    with pytest.raises(ValueError, match="either a sampler or"):
        BatchStream(synthetic_store, "train", batch_size=64, sampler=BlockShuffleSampler(start, stop, 64))
    with pytest.raises(ValueError, match="the 'val' split"):
        BatchStream(synthetic_store, "val", sampler=BlockShuffleSampler(start, stop, 64))


def test_sampler_windows_cover_steps():
    s = BlockShuffleSampler(10, 1010, batch_size=64, block_size=7, buffer_batches=3, seed=1, rank=1, world_size=2)
    groups = list(s.windows(0))
    steps = [step for g in groups for step, _ in g]
    assert steps == list(range(len(s))) and all(len(g) <= 3 for g in groups)
    order = s.order(0)
    assert len(set(order)) == len(order) == 500 and order.min() >= 10 and order.max() < 1010


# --- resident shards ---------------------------------------------------------------------------------------------
def _cells(stream, output="dense"):
    """{store row: its values as a dense float32 row} over one epoch."""
    from cellssl.kernels import csr_rows_to_dense, csr_to_dense

    got = {}
    for batch in stream:
        if batch.resident is not None:  # device-resident: densified where it lies (here: CPU tensors)
            shard = batch.resident
            dense = csr_rows_to_dense(shard.indptr, shard.indices, shard.data, batch.rows, stream.store.n_genes,
                                      1e4 if stream.store.value_kind == "counts" else None).numpy()
        elif output == "csr":
            dense = csr_to_dense(batch.indptr, batch.indices, batch.data, stream.store.n_genes).numpy()
        else:
            dense = batch.x.numpy()
        got.update({int(i): row.copy() for i, row in zip(batch.index, dense)})
    return got


@pytest.fixture(scope="module")
def log1p_store(tmp_path_factory):
    from cellssl.loaders.convert import convert, open_source
    from cellssl.loaders.synth import synth

    root = tmp_path_factory.mktemp("log1p")
    return convert(open_source("sctab", synth(root / "sctab", 600, "sctab-parquet", progress=False)),
                   root / "s.cellstore", progress=False)


@pytest.mark.parametrize("kind", ["counts", "log1p"])
@pytest.mark.parametrize("output", ["dense", "csr"])
def test_resident_and_streaming_give_the_same_cells_and_values(synthetic_store, log1p_store, kind, output):
    store = CellStore(synthetic_store) if kind == "counts" else log1p_store
    streamed = _cells(BatchStream(store, "train", 64, seed=1, drop_last=False, output=output), output)
    for resident in ("host", "device"):
        held = BatchStream(store, "train", 64, seed=1, drop_last=False, output=output, resident=resident,
                           device="cpu" if resident == "device" else None)
        assert held.residence == resident and held.sampler.kind == "uniform_shard"
        got = _cells(held, output)
        assert got.keys() == streamed.keys()
        for row, values in got.items():  # the same numbers: bit for bit on the host, to float rounding on a device
            tolerance = 0 if resident == "host" else 1e-6
            np.testing.assert_allclose(values, streamed[row], rtol=tolerance, atol=tolerance)


def test_resident_epochs_are_uniform_permutations_and_resume_exactly(synthetic_store):
    stream = BatchStream(synthetic_store, "train", 100, seed=4, resident="host")
    first = [b.index.numpy().copy() for b in stream]
    stream.set_epoch(1)
    second = [b.index.numpy().copy() for b in stream]
    assert not np.array_equal(first[0], second[0])
    start, stop = CellStore(synthetic_store).split("train")
    assert set(np.concatenate(first)) <= set(range(start, stop)) and len(np.concatenate(first)) == 12 * 100
    stream.set_epoch(3)
    it = iter(stream)
    for _ in range(5):
        next(it)
    state = stream.state_dict()
    rest = [b.index.numpy().copy() for b in it]
    again = BatchStream(synthetic_store, "train", 100, seed=4, resident="host")
    again.load_state_dict(state)
    assert all(np.array_equal(a, b.index.numpy()) for a, b in zip(rest, again))
    with pytest.raises(InputError, match="sampler"):  # a resident position is not a streaming one
        BatchStream(synthetic_store, "train", 100, seed=4).load_state_dict(state)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resident_ranks_cover_the_split_disjointly(synthetic_store, world):
    seen = []
    for rank in range(world):
        stream = BatchStream(synthetic_store, "train", 50, seed=2, rank=rank, world_size=world, drop_last=False,
                             resident="host")
        seen.append(np.concatenate([b.index.numpy() for b in stream]))
    start, stop = CellStore(synthetic_store).split("train")
    everything = np.concatenate(seen)
    assert len(everything) == stop - start and set(everything) == set(range(start, stop))


def test_auto_streams_when_memory_is_short_and_explicit_requests_are_refused(synthetic_store, monkeypatch):
    import psutil

    from cellssl.loaders import resident

    class Short:
        available = 1000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Short())
    stream = BatchStream(synthetic_store, "train", 64, resident="auto")
    assert stream.residence == "off" and "does not fit" in stream.residence_reason
    assert stream.sampler.kind == "block_shuffle"
    with pytest.raises(InputError, match="--resident host: this rank's share is .* GB; 0.0 GB of RAM"):
        BatchStream(synthetic_store, "train", 64, resident="host")
    with pytest.raises(InputError, match="no device to hold the share"):
        BatchStream(synthetic_store, "train", 64, resident="device")
    del resident
