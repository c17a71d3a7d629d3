import numpy as np
import pytest

from input_pipeline import schema


def _record(n=5, fmt="png"):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (n, 16, 24, 3), dtype=np.uint8)
    boxes = rng.uniform(0, 16, (n, 4)).astype(np.float32)
    rec = schema.ClipRecord.from_frames(frames, 25.0, boxes, image_format=fmt, meta={"clip_id": "a#0", "x": [1, 2]},
                                        arrays={"motion": rng.normal(size=(n, 12)).astype(np.float32),
                                                "identity": np.arange(7, dtype=np.float64)})
    return frames, rec


def test_round_trip_exact_png():
    frames, rec = _record()
    back = schema.deserialize(schema.serialize(rec))
    assert back.num_frames == 5 and back.fps == 25.0 and (back.height, back.width) == (16, 24)
    assert back.meta == {"clip_id": "a#0", "x": [1, 2]}
    np.testing.assert_array_equal(back.boxes, rec.boxes)
    np.testing.assert_array_equal(back.arrays["motion"], rec.arrays["motion"])
    assert back.arrays["identity"].dtype == np.float64
    np.testing.assert_array_equal(back.decode_frames(), frames)
    np.testing.assert_array_equal(back.decode_frames([3, 1]), frames[[3, 1]])


def test_jpeg_is_lossy_but_close():
    _, rec = _record()
    y, x = np.mgrid[0:32, 0:48]
    frames = np.stack([np.stack([x * 5, y * 7, (x + y + 10 * t) * 3], -1) for t in range(5)]).astype(np.uint8)
    rec = schema.ClipRecord.from_frames(frames, 30, rec.boxes, quality=98)
    back = schema.deserialize(schema.serialize(rec))
    assert back.image_format == "jpeg"
    assert np.abs(back.decode_frames().astype(int) - frames).mean() < 3


def test_corrupt_records():
    _, rec = _record()
    data = schema.serialize(rec)
    with pytest.raises(schema.SchemaError, match="magic"):
        schema.deserialize(b"garbage" + data)
    with pytest.raises(schema.SchemaError):
        schema.deserialize(data[:-3])
    with pytest.raises(schema.SchemaError, match="trailing"):
        schema.deserialize(data + b"xx")
    with pytest.raises(schema.SchemaError, match="boxes"):
        schema.ClipRecord(frames=[b"a", b"b"], fps=1, boxes=np.zeros((3, 4)), height=1, width=1)
