import numpy as np
import pytest

from input_pipeline import pipeline


@pytest.fixture(scope="module")
def source():
    return pipeline.SyntheticClipSource(num_clips=6, num_frames=10, size=48, seed=3)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_pairs_shapes_and_pairing(source):
    ds = pipeline.pairs_dataset(source, batch_size=4, resolution=32, seed=0, shard_index=0, shard_count=1)
    batch = ds[0]
    assert batch["source"].shape == (4, 32, 32, 3) and batch["source"].dtype == np.uint8
    assert batch["driving"].shape == (4, 32, 32, 3)
    assert batch["source_box"].shape == (4, 4) and batch["driving_box"].dtype == np.float32
    assert batch["frame_index"].shape == (4, 2)
    assert (batch["frame_index"][:, 0] != batch["frame_index"][:, 1]).all()
    # the pair really is frames i and j of clip c: compare against rendering those frames directly
    for b in range(4):
        clip = source[int(batch["clip_index"][b])]
        frames, boxes, extra = pipeline.take_frames(clip, batch["frame_index"][b])
        expected, expected_boxes = pipeline._fit(frames, boxes, 32)
        np.testing.assert_array_equal(batch["source"][b], expected[0])
        np.testing.assert_array_equal(batch["driving"][b], expected[1])
        np.testing.assert_allclose(batch["driving_box"][b], expected_boxes[1])
        np.testing.assert_array_equal(batch["driving_motion"][b], extra["motion"][1])


def test_pairs_are_deterministic_and_epochs_cover_all_clips(source):
    make = lambda seed: pipeline.pairs_dataset(source, batch_size=3, resolution=32, seed=seed,  # noqa: E731
                                               shard_index=0, shard_count=1)
    _same([make(1)[i] for i in range(2)], [make(1)[i] for i in range(2)])
    assert not np.array_equal(make(1)[0]["clip_index"], make(2)[0]["clip_index"]) or \
        not np.array_equal(make(1)[0]["frame_index"], make(2)[0]["frame_index"])
    ds = make(1)
    epoch0 = np.concatenate([ds[0]["clip_index"], ds[1]["clip_index"]])
    epoch1 = np.concatenate([ds[2]["clip_index"], ds[3]["clip_index"]])
    assert sorted(epoch0) == sorted(epoch1) == list(range(6))
    assert list(epoch0) != list(epoch1)  # reshuffled every epoch


def test_max_gap(source):
    ds = pipeline.pairs_dataset(source, batch_size=6, resolution=32, seed=0, max_gap=2, shard_index=0, shard_count=1)
    for i in range(3):
        gap = np.abs(np.diff(ds[i]["frame_index"], axis=1))
        assert (gap >= 1).all() and (gap <= 2).all()


def test_process_sharding_is_disjoint(source):
    seen = []
    for index in range(2):
        ds = pipeline.pairs_dataset(source, batch_size=3, resolution=32, seed=0, num_epochs=1, shuffle=False,
                                    shard_index=index, shard_count=2)
        seen.append({int(c) for c in ds[0]["clip_index"]})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(6))


def test_clips_window_and_reference(source):
    ds = pipeline.clips_dataset(source, batch_size=2, num_frames=4, stride=2, resolution=32, seed=0,
                                shard_index=0, shard_count=1)
    batch = ds[0]
    assert batch["frames"].shape == (2, 4, 32, 32, 3) and batch["reference"].shape == (2, 32, 32, 3)
    assert batch["boxes"].shape == (2, 4, 4) and batch["motion"].shape[:2] == (2, 4)
    for b in range(2):
        clip = source[int(batch["clip_index"][b])]
        start = int(batch["start"][b])
        idx = [start, start + 2, start + 4, start + 6, int(batch["reference_index"][b])]
        assert idx[3] < 10
        frames, _, extra = pipeline.take_frames(clip, idx)
        np.testing.assert_array_equal(batch["motion"][b], extra["motion"][:4])  # consecutive, stride 2
        np.testing.assert_array_equal(batch["reference"][b], pipeline._fit(frames, np.zeros((5, 4)), 32)[0][4])
    with pytest.raises(Exception, match="needs 19"):
        pipeline.clips_dataset(source, batch_size=1, num_frames=10, stride=2, resolution=32,
                               shard_index=0, shard_count=1)[0]


def test_augmented_pairs(source):
    from input_pipeline.augment import AugmentConfig

    ds = pipeline.pairs_dataset(source, batch_size=2, resolution=32, seed=0, augment=AugmentConfig(),
                                shard_index=0, shard_count=1)
    plain = pipeline.pairs_dataset(source, batch_size=2, resolution=32, seed=0, shard_index=0, shard_count=1)
    a, p = ds[0], plain[0]
    np.testing.assert_array_equal(a["source"], p["source"])  # only the driving frame is augmented
    assert not np.array_equal(a["driving"], p["driving"])
    _same([ds[0]], [ds[0]])


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_restores_exactly(source, workers):
    ds = pipeline.pairs_dataset(source, batch_size=2, resolution=32, seed=5, shard_index=0, shard_count=1)
    it = pipeline.make_iterator(ds, worker_count=workers)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)
    it2 = pipeline.make_iterator(ds, worker_count=workers)
    it2.set_state(state)
    _same(_take(it2, 4), expected)


def test_iterator_checkpoint_with_orbax(tmp_path, source):
    import grain
    import orbax.checkpoint as ocp

    ds = pipeline.pairs_dataset(source, batch_size=2, resolution=32, seed=7, shard_index=0, shard_count=1)
    it = pipeline.make_iterator(ds)
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 3)
    fresh = pipeline.make_iterator(ds)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        assert mngr.latest_step() == 2
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _same(_take(fresh, 3), expected)


def test_open_source_errors(tmp_path):
    from input_pipeline.errors import UserError

    with pytest.raises(UserError, match="not a folder"):
        pipeline.open_source(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not a dataset folder"):
        pipeline.open_source(str(tmp_path))
    train = pipeline.open_source("", "train", synthetic_clips=4, synthetic_frames=4, synthetic_size=32)
    held_out = pipeline.open_source("", "eval", synthetic_clips=4, synthetic_frames=4, synthetic_size=32)
    assert train[0].seed != held_out[0].seed


def test_synthetic_fps_sets_the_motion_frame_rate():
    """``synthetic_fps`` (config ``data.synthetic_fps``) renders the clips' motion at that frame rate: frame k
    shows the trajectory at time k / fps, so a lower rate spans more of it in the same frames."""
    from input_pipeline import synthetic

    slow = pipeline.open_source("", "train", synthetic_clips=2, synthetic_frames=4, synthetic_size=32,
                                synthetic_fps=5.0)
    clip = slow[1]
    assert clip.fps == 5.0 and "5 fps" in repr(slow)
    _, motion_seed = synthetic.derive_seeds(clip.seed)
    expected = synthetic.sample_motion(motion_seed, 4, fps=5.0)
    np.testing.assert_array_equal(pipeline.take_frames(clip, [0, 3])[2]["motion"], expected[[0, 3]])
    default = pipeline.open_source("", "train", synthetic_clips=2, synthetic_frames=4, synthetic_size=32)[1]
    assert default.seed == clip.seed and default.fps == 25.0
    assert not np.allclose(synthetic.sample_motion(motion_seed, 4, fps=25.0)[3], expected[3])
