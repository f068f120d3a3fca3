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
    assert state["epoch"] == 2 and state["position"] == 400
    resumed = make_stream(synthetic_store, seed=5)
    resumed.load_state_dict(state)
    rest = [(b.index.numpy().copy(), b.x.numpy().copy()) for b in resumed]
    assert len(rest) == len(full) - 4
    for (i1, x1), (i2, x2) in zip(full[4:], rest):
        assert np.array_equal(i1, i2) and np.array_equal(x1, x2)
    with pytest.raises(InputError, match="cannot resume the loader: the saved position has seed=5, this launch 6"):
        make_stream(synthetic_store, seed=6).load_state_dict(state)
    for bad in ({"position": (len(resumed) + 1) * 100}, {"position": -100}, {"epoch": -2}, {"position": "300"},
                {"position": 150}):
        with pytest.raises(InputError, match="is not a micro-batch boundary"):
            make_stream(synthetic_store, seed=5).load_state_dict({**state, **bad})
    with pytest.raises(InputError, match="the saved position has store="):
        make_stream(synthetic_store, seed=5).load_state_dict({**state, "store": "another store"})


def test_ranks_the_last_cells_miss_take_the_same_steps_with_empty_batches(synthetic_store):
    """Evaluation keeps a last, shorter global batch; a rank it does not reach gets an empty batch there, so every
    rank takes the same steps (collectives stay in step) and the ranks together see every cell once."""
    store = CellStore(synthetic_store)
    start, stop = store.split("val")
    n = stop - start
    world = n + 3  # more ranks than cells: three slices are empty
    seen, steps = [], set()
    for rank in range(world):
        batches = list(BatchStream(store, "val", batch_size=4, rank=rank, world_size=world, drop_last=False,
                                   columns=[]))
        steps.add(len(batches))
        seen += [int(i) for b in batches for i in b.index]
    assert sorted(seen) == list(range(start, stop)) and len(steps) == 1


def test_endless_stream_crosses_epochs_and_resumes(synthetic_store):
    stream = make_stream(synthetic_store, seed=3)
    per_epoch = len(stream)
    taken = []
    for batch in stream.endless():
        taken.append((batch.epoch, batch.step))
        if len(taken) == per_epoch + 2:
            break
    assert taken[per_epoch - 1] == (0, per_epoch - 1) and taken[per_epoch:] == [(1, 0), (1, 1)]
    assert stream.state_dict()["epoch"] == 1 and stream.state_dict()["position"] == 200


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
    assert stream.state_dict()["position"] == (ahead.step + 1) * 100 and state["position"] == (trained.step + 1) * 100
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
    with pytest.raises(InputError, match="--batch-size: 5000 × 1 rank.* = 5,000 cells a step exceeds the 1,200 cells .*"
                       "use --batch-size 1200 or less"):
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
    assert len(set(order)) == len(order) == 1000 and order.min() >= 10 and order.max() < 1010


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
        assert held.residence == resident and held.sampler.kind == "block_shuffle"
        got = _cells(held, output)
        assert got.keys() == streamed.keys()
        for row, values in got.items():  # the same numbers: bit for bit on the host, to float rounding on a device
            tolerance = 0 if resident == "host" else 1e-6
            np.testing.assert_allclose(values, streamed[row], rtol=tolerance, atol=tolerance)


def test_resident_batches_are_the_streaming_ones_and_resume_exactly(synthetic_store):
    """Where the cells are held never changes which cells a step sees: a resident stream walks the same global
    order as a streaming one, and a position saved by either resumes the other."""
    stream = BatchStream(synthetic_store, "train", 100, seed=4, resident="host")
    first = [b.index.numpy().copy() for b in stream]
    streamed = [b.index.numpy().copy() for b in BatchStream(synthetic_store, "train", 100, seed=4)]
    assert all(np.array_equal(a, b) for a, b in zip(first, streamed)) and len(first) == len(streamed)
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
    for resident in ("host", "off"):
        again = BatchStream(synthetic_store, "train", 100, seed=4, resident=resident)
        again.load_state_dict(state)
        assert all(np.array_equal(a, b.index.numpy()) for a, b in zip(rest, again))


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
    with pytest.raises(InputError, match="--resident host: the split is .* GB; 0.0 GB of RAM is available to each of 1"):
        BatchStream(synthetic_store, "train", 64, resident="host")
    with pytest.raises(InputError, match="no device to hold the share"):
        BatchStream(synthetic_store, "train", 64, resident="device")
    del resident


# --- one global order, whatever the ranks -------------------------------------------------------------------------
def _steps(start, stop, batch, world, accumulation, epoch=1, **kw):
    """{optimiser step: the set of cells it sees over every rank and micro-batch}."""
    steps = {}
    for rank in range(world):
        s = BlockShuffleSampler(start, stop, batch, 7, rank, world, accumulation=accumulation, block_size=16, **kw)
        for step, rows in s.batches(epoch):
            steps.setdefault(step // accumulation, set()).update(int(r) for r in rows)
    return steps


@pytest.mark.parametrize("drop_last", [True, False])
def test_global_batches_do_not_depend_on_ranks_or_accumulation(drop_last):
    """1 rank × 96, 2 ranks × 48, 4 ranks × 24, 1 rank × 48 with accumulation 2 and 2 ranks × 24 with accumulation 2
    see the same cells in every step of every epoch."""
    one = _steps(5, 1005, 96, 1, 1, drop_last=drop_last)
    for batch, world, accumulation in ((48, 2, 1), (24, 4, 1), (48, 1, 2), (24, 2, 2)):
        if not drop_last and accumulation > 1:
            continue  # evaluation does not accumulate
        assert _steps(5, 1005, batch, world, accumulation, drop_last=drop_last) == one, (batch, world, accumulation)
    assert len(one) == (1000 // 96 if drop_last else -(-1000 // 96))


def test_a_position_resumes_on_another_number_of_ranks(synthetic_store):
    """A position saved by 2 ranks × 50 resumes on 1 rank × 100 (and 4 × 25) at the same global batch; another
    global batch is refused, naming it."""
    two = [BatchStream(synthetic_store, "train", 50, seed=2, rank=r, world_size=2) for r in range(2)]
    for stream in two:
        it = iter(stream)
        for _ in range(3):
            next(it)
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["position"] == 300
    one = BatchStream(synthetic_store, "train", 100, seed=2)
    rest = [set(b.index.numpy()) for b in BatchStream(synthetic_store, "train", 100, seed=2)][3:]
    one.load_state_dict(state)
    assert [set(b.index.numpy()) for b in one] == rest
    four = [BatchStream(synthetic_store, "train", 25, seed=2, rank=r, world_size=4) for r in range(4)]
    for stream in four:
        stream.load_state_dict(state)
    assert [set().union(*(set(b.index.numpy()) for b in batches)) for batches in zip(*four)] == rest
    with pytest.raises(InputError, match="global_batch=100, this launch 200.*--gradient-accumulation × ranks"):
        BatchStream(synthetic_store, "train", 200, seed=2).load_state_dict(state)


def test_rank_and_world_come_from_the_environment(synthetic_store, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = BatchStream(synthetic_store, "train", 50)
    assert (stream.sampler.rank, stream.sampler.world_size) == (1, 2)
    assert BatchStream(synthetic_store, "train", 50, rank=0, world_size=1).sampler.world_size == 1
