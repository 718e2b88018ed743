"""`samlight annotate`'s server: prompt -> mask -> accept -> the SA-1B record on disk, restart after SIGKILL,
loading and correcting automatic masks, the embedding cache, safety (path traversal, request size, bad files)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests._annotate import LiveServer, make_images, session
from tests._shards import read_shards, stream_datamodule

pytest.importorskip("flask")


def _key(store, image_id: str) -> str:
    return store.folder.get(image_id).key


def test_click_accept_writes_the_exact_sa1b_record(tmp_path):
    engine, store, _, client = session(tmp_path)
    opened = client.post("/api/open", json={"image": "img1.png"}).json
    assert (opened["width"], opened["height"], opened["annotations"]) == (128, 96, [])

    one = client.post("/api/predict", json={"image": "img1.png", "points": [[60.0, 40.0, 1]]}).json
    assert len(one["masks"]) == 3  # a single click is ambiguous: three candidates to cycle
    assert one["best"] == int(np.argmax([m["score"] for m in one["masks"]]))
    two = client.post(
        "/api/predict",
        json={
            "image": "img1.png",
            "points": [[60.0, 40.0, 1], [5.0, 5.0, 0]],
            "previous": one["prediction"],
            "candidate": 1,
        },
    ).json
    assert len(two["masks"]) == 1
    shown = engine.get_prediction(two["prediction"])
    # The previous prediction's chosen candidate was fed back as the mask prompt: without it the answer differs.
    plain = engine.predict("img1.png", np.array([[60.0, 40.0], [5.0, 5.0]]), np.array([1, 0]))
    assert not np.allclose(plain.low_res_logits, shown.low_res_logits)

    saved = client.post("/api/accept", json={"prediction": two["prediction"], "candidate": 0}).json
    record = read_shards(tmp_path / "out" / "shards")[_key(store, "img1.png")]
    mask = engine.full_mask(shown, 0)
    np.testing.assert_array_equal(mask, shown.masks[0])  # a small image is shown at full size
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    expected = {
        "id": 0,
        "segmentation": {"size": [96, 128], "counts": rle["counts"].decode()},
        "area": int(mask.sum()),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "predicted_iou": round(float(shown.scores[0]), 6),
        "stability_score": round(float(shown.stability[0]), 6),
        "point_coords": [[60.0, 40.0], [5.0, 5.0]],
        "crop_box": [0.0, 0.0, 128.0, 96.0],
        "point_labels": [1, 0],
        "prompt_box": None,
        "source": "human",
        "model_round": 0,
    }
    assert record["json"]["annotations"] == [expected]
    assert saved["record"] == expected
    assert record["json"]["image"] == {
        "image_id": 1,
        "file_name": f"{_key(store, 'img1.png')}.jpg",
        "height": 96,
        "width": 128,
        "source_file": "img1.png",
    }
    np.testing.assert_array_equal(record["masks"][0], mask)


def _pick(response: dict, pixels: int = 96 * 128) -> int:
    """The candidate a person would keep: the smallest non-empty one under 90% of the image (random weights
    also propose near-full masks, which training drops)."""
    ok = [(m["area"], i) for i, m in enumerate(response["masks"]) if 0 < m["area"] < 0.9 * pixels]
    assert ok, [m["area"] for m in response["masks"]]
    return min(ok)[1]


def test_box_prompt_and_shards_stream_through_the_datamodule(tmp_path):
    _, store, _, client = session(tmp_path)
    client.post("/api/open", json={"image": "img0.png"})
    r = client.post("/api/predict", json={"image": "img0.png", "box": [90, 60, 30, 20]}).json
    assert len(r["masks"]) == 1
    assert client.post("/api/accept", json={"prediction": r["prediction"], "candidate": 0}).status_code == 200
    box_record = read_shards(tmp_path / "out" / "shards")[_key(store, "img0.png")]["json"]["annotations"][0]
    assert box_record["prompt_box"] == [30.0, 20.0, 90.0, 60.0] and box_record["point_coords"] == []
    client.post("/api/delete", json={"image": "img0.png", "id": 0})
    for image_id in ("img0.png", "sub/photo.jpg"):
        client.post("/api/open", json={"image": image_id})
        r = client.post("/api/predict", json={"image": image_id, "points": [[60, 40, 1]]}).json
        assert (
            client.post(
                "/api/accept", json={"prediction": r["prediction"], "candidate": _pick(r)}
            ).status_code
            == 200
        )
    records = read_shards(tmp_path / "out" / "shards")
    # The JPEG is stored as the original bytes (no re-compression).
    assert (tmp_path / "images" / "sub" / "photo.jpg").read_bytes() == _member(store, "sub/photo.jpg", "jpg")
    streamed = stream_datamodule(tmp_path / "out" / "shards", image_size=64)
    assert sorted(streamed) == sorted(records)
    for key, sample in streamed.items():
        assert sample["masks"].shape[0] == 1 and sample["masks"].any(), key
        assert sample["info"]["source_file"] in ("img0.png", "sub/photo.jpg")


def _member(store, image_id: str, ext: str) -> bytes:
    import webdataset as wds

    for sample in wds.WebDataset(str(store.shard_path(image_id)), shardshuffle=False, empty_check=False):
        return sample[ext]
    raise AssertionError("empty shard")


def test_large_image_candidates_come_downscaled_and_the_saved_mask_is_full_size(tmp_path):
    import torch
    from PIL import Image

    from samlight.inference.predictor import SamPredictor

    make_images(tmp_path / "images")
    big = np.random.default_rng(1).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "images" / "big.png")
    Image.fromarray(big[:192, :256]).save(tmp_path / "images" / "input_frame.png")  # tiny's input frame
    engine, store, _, client = session(tmp_path)
    exact = engine.predict("input_frame.png", np.array([[100.0, 90.0]]), np.array([1]))  # display == input
    low = torch.as_tensor(exact.low_res_logits)[None]
    expected = engine.model.postprocess_masks(low, (192, 256), (192, 256))[0] > 0
    np.testing.assert_array_equal(exact.masks, expected.numpy())
    client.post("/api/open", json={"image": "big.png"})
    r = client.post("/api/predict", json={"image": "big.png", "points": [[800, 600, 1], [100, 100, 0]]}).json
    assert r["frame"] == [768, 1024] and r["masks"][0]["rle"]["size"] == [768, 1024]
    # The display masks are Sam.postprocess_masks to the display frame (its second resize skipped as identity).
    shown = engine.get_prediction(r["prediction"])
    low = torch.as_tensor(shown.low_res_logits)[None]
    expected = engine.model.postprocess_masks(low, shown.input_size, (768, 1024))[0] > 0
    np.testing.assert_array_equal(shown.masks, expected.numpy())
    record = client.post("/api/accept", json={"prediction": r["prediction"], "candidate": 0}).json["record"]
    assert record["segmentation"]["size"] == [1200, 1600]
    # The saved mask is exactly what SamPredictor gives at full resolution for the same prompt.
    predictor = SamPredictor(engine.model)
    predictor.set_image(big)
    masks, _, _ = predictor.predict(
        point_coords=np.array([[800.0, 600.0], [100.0, 100.0]]),
        point_labels=np.array([1, 0]),
        multimask_output=False,
    )
    np.testing.assert_array_equal(mask_utils.decode(record["segmentation"]).astype(bool), masks[0])


def test_delete_undo_and_the_shard_follows(tmp_path):
    _, store, _, client = session(tmp_path)
    client.post("/api/open", json={"image": "img0.png"})
    ids = []
    for point in ([60, 40, 1], [10, 10, 1]):
        r = client.post("/api/predict", json={"image": "img0.png", "points": [point]}).json
        k = _pick(r)
        ids.append(
            client.post("/api/accept", json={"prediction": r["prediction"], "candidate": k}).json["record"][
                "id"
            ]
        )
    assert ids == [0, 1]
    assert client.post("/api/delete", json={"image": "img0.png", "id": 0}).status_code == 200
    anns = read_shards(tmp_path / "out" / "shards")[_key(store, "img0.png")]["json"]["annotations"]
    assert [a["id"] for a in anns] == [1]
    assert client.post("/api/delete", json={"image": "img0.png", "id": 0}).status_code == 404
    client.post("/api/delete", json={"image": "img0.png", "id": 1})
    assert not store.shard_path("img0.png").exists()  # no mask left: no shard (training would skip it)


@pytest.mark.slow
def test_restart_after_sigkill_keeps_every_mask_and_the_image(tmp_path):
    server = LiveServer(tmp_path)
    try:
        state = server.get("/api/state")
        assert state["current"] == "img0.png"
        server.post("/api/open", {"image": "img2.png"})
        accepted = []
        for point in ([60, 45, 1], [100, 80, 1]):
            r = server.post("/api/predict", {"image": "img2.png", "points": [point]})
            k = _pick(r)
            accepted.append(
                server.post("/api/accept", {"prediction": r["prediction"], "candidate": k})["record"]
            )
    finally:
        server.kill()
    assert server.process.returncode == -9
    again = LiveServer(tmp_path)
    try:
        state = again.get("/api/state")
        assert state["current"] == "img2.png"
        assert state["counts"]["human"] == 2
        opened = again.post("/api/open", {"image": "img2.png"})
        assert opened["embedding_cached"] is True  # computed once, before the kill
        assert [a["rle"] for a in opened["annotations"]] == [a["segmentation"] for a in accepted]
    finally:
        again.kill()
    assert not list((tmp_path / "out" / "shards").glob("*.tmp")) and not list(
        (tmp_path / "out").glob(".*.tmp")
    )


def test_automatic_masks_load_and_can_be_corrected(tmp_path):
    from samlight.datamodules.tools.shards import SA1BShardWriter, annotations_from_masks

    make_images(tmp_path / "images")
    auto = np.zeros((2, 96, 128), bool)
    auto[0, 20:60, 30:90] = True
    auto[1, 0:10, 0:10] = True
    anns = [dict(a, source="auto") for a in annotations_from_masks(auto)]
    with SA1BShardWriter(tmp_path / "auto", prefix="auto") as writer:
        writer.write(
            "sa_1", np.zeros((96, 128, 3), np.uint8), annotations=anns, image_info={"source_file": "img0.png"}
        )
    engine, store, _, client = session(tmp_path, "--existing", str(tmp_path / "auto" / "*.tar"))
    opened = client.post("/api/open", json={"image": "img0.png"}).json
    assert [(a["id"], a["source"]) for a in opened["annotations"]] == [(0, "auto"), (1, "auto")]
    assert not store.shard_path("img0.png").exists()  # untouched images are not copied

    r = client.post("/api/predict", json={"image": "img0.png", "points": [[60, 40, 1]], "base": 0}).json
    prediction = engine.get_prediction(r["prediction"])
    base_fed = engine.predict("img0.png", np.array([[60.0, 40.0]]), np.array([1]), base_mask=auto[0])
    np.testing.assert_allclose(prediction.low_res_logits, base_fed.low_res_logits)
    client.post("/api/accept", json={"prediction": r["prediction"], "candidate": 0, "replaces": 0})
    saved = read_shards(tmp_path / "out" / "shards")[_key(store, "img0.png")]["json"]["annotations"]
    assert [(a["id"], a["source"]) for a in saved] == [(1, "auto"), (2, "human")]
    # Restart: the corrected state wins over the automatic shards.
    _, store2, _, _ = session(tmp_path, "--existing", str(tmp_path / "auto" / "*.tar"))
    assert [(a["id"], a["source"]) for a in store2.annotations("img0.png")] == [(1, "auto"), (2, "human")]


def test_embedding_cache_is_plain_npy_and_reused(tmp_path):
    engine, _, _, client = session(tmp_path)
    first = client.post("/api/open", json={"image": "img0.png"}).json
    assert first["embedding_cached"] is False
    files = list((tmp_path / "out" / "embeddings").rglob("*.npy"))
    assert files
    cached = np.load(files[0], allow_pickle=False)
    np.testing.assert_array_equal(cached, engine.embedding("img0.png").numpy())
    engine.prefetch("img1.png")
    engine.embedding_future("img1.png").result(timeout=30)
    engine2, _, _, client2 = session(tmp_path)
    assert client2.post("/api/open", json={"image": "img1.png"}).json["embedding_cached"] is True
    a = engine.predict("img0.png", np.array([[60.0, 40.0]]), np.array([1]))
    b = engine2.predict("img0.png", np.array([[60.0, 40.0]]), np.array([1]))
    np.testing.assert_array_equal(a.masks, b.masks)


def test_only_listed_images_and_static_files_are_served(tmp_path):
    make_images(tmp_path / "images")
    (tmp_path / "secret.png").write_bytes((tmp_path / "images" / "img0.png").read_bytes())
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    os.symlink(tmp_path / "secret.png", tmp_path / "images" / "link.png")
    _, _, _, client = session(tmp_path)
    assert client.get("/api/image?id=img0.png").status_code == 200
    assert client.get("/api/image?id=sub/photo.jpg").status_code == 200
    for bad in (
        "../secret.png",
        str(tmp_path / "secret.png"),
        "link.png",
        "notes.txt",
        "sub/../img0.png",
        "..%2fsecret.png",
        "",
        "../tiny.pth",
    ):
        assert client.get(f"/api/image?id={bad}").status_code == 404, bad
    for bad in (
        "/static/../server.py",
        "/static/%2e%2e/server.py",
        "/static/..%2fserver.py",
        "/tiny.pth",
        "/static//etc/passwd",
    ):
        assert client.get(bad, follow_redirects=True).status_code == 404, bad
    assert client.get("/static/app.js").status_code == 200
    assert client.post("/api/open", json={"image": "../secret.png"}).status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and b"Shortcuts" in page.data
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]


def test_requests_are_bounded_and_validated(tmp_path):
    _, _, _, client = session(tmp_path)
    big = client.post("/api/predict", data=b"{" + b" " * 70_000 + b"}", content_type="application/json")
    assert big.status_code == 413
    client.post("/api/open", json={"image": "img0.png"})
    too_many = [[1, 1, 1]] * 65
    assert client.post("/api/predict", json={"image": "img0.png", "points": too_many}).status_code == 400
    r = client.post("/api/predict", json={"image": "img0.png", "points": [[500, 1, 1]]})
    assert r.status_code == 400 and "outside the image" in r.json["error"]
    assert client.post("/api/predict", json={"image": "img0.png", "points": [[1, 1, 7]]}).status_code == 400
    assert client.post("/api/predict", json={"image": "img0.png", "points": "x"}).status_code == 400
    assert client.post("/api/predict", data="not json", content_type="text/plain").status_code == 400
    assert client.post("/api/accept", json={"prediction": 9999, "candidate": 0}).status_code == 409


def test_bad_image_and_bad_checkpoint_give_clear_errors(tmp_path, capsys):
    from samlight.cli.annotate import main

    make_images(tmp_path / "images")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _, _, _, client = session(tmp_path)
    r = client.post("/api/open", json={"image": "broken.png"})
    assert (
        r.status_code == 422 and "broken.png" in r.json["error"] and "not a readable image" in r.json["error"]
    )
    assert client.post("/api/open", json={"image": "img0.png"}).status_code == 200  # the session goes on

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    args = ["--images", str(tmp_path / "images"), "--output", str(tmp_path / "o2")]
    assert main(["--checkpoint", str(bad), *args]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing.pth"), *args]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path / "tiny.pth"),
                "--images",
                str(tmp_path / "nope"),
                "--output",
                str(tmp_path / "o3"),
            ]
        )
        == 2
    )
    assert "not a folder" in capsys.readouterr().err


def test_heldout_split_is_stable_and_leaves_training_data():
    from samlight.inference.annotate.retrain import heldout_split

    ids = [f"im{i}.png" for i in range(50)]
    train, held = heldout_split(ids, 0.2)
    assert 3 <= len(held) <= 20 and set(train) | set(held) == set(ids) and not set(train) & set(held)
    train2, held2 = heldout_split(ids + ["new.png"], 0.2)
    assert set(held) <= set(held2)  # adding an image never moves an old one between the parts
    assert heldout_split(["a.png"], 0.2) == (["a.png"], [])
    t, h = heldout_split(["a.png", "b.png"], 0.2)
    assert len(t) == 1 and len(h) == 1


@pytest.mark.slow
def test_retrain_round_fine_tunes_reports_miou_and_swaps_weights(tmp_path):
    import yaml

    fast = tmp_path / "fast.yaml"
    fast.write_text(
        yaml.safe_dump(
            {
                "trainer": {"max_steps": 2, "accelerator": "cpu"},
                "data": {
                    "init_args": {
                        "batch_size": 1,
                        "num_workers": 0,
                        "batches_per_epoch": 2,
                        "image_size": 256,
                    }
                },
            }
        )
    )
    engine, store, retrainer, client = session(
        tmp_path, "--retrain-config", str(fast), "--retrain-every", "3"
    )
    before = {k: v.clone() for k, v in engine.model.mask_decoder.state_dict().items()}
    fingerprint = engine.fingerprint
    assert client.post("/api/retrain").status_code == 409  # nothing annotated yet
    for image_id in ("img0.png", "img1.png", "img2.png"):
        client.post("/api/open", json={"image": image_id})
        r = client.post("/api/predict", json={"image": image_id, "points": [[60, 40, 1]]}).json
        client.post("/api/accept", json={"prediction": r["prediction"], "candidate": _pick(r)})
    # --retrain-every 3: the third accept started a round by itself; the page keeps answering meanwhile.
    assert client.get("/api/state").json["retrain"]["state"] in ("starting", "evaluating", "training", "idle")
    assert client.post("/api/predict", json={"image": "img0.png", "points": [[60, 40, 1]]}).status_code == 200
    retrainer.wait(timeout=240)
    status = client.get("/api/state").json
    assert status["retrain"]["state"] == "idle", status["retrain"]
    (result,) = status["retrain"]["history"]
    assert result["round"] == 1 and status["model_round"] == 1 and result["human_masks"] == 3
    assert client.get("/api/retrain").json == {"model_round": 1, "retrain": status["retrain"]}
    assert result["train_images"] == 2 and len(result["heldout_images"]) == 1 and result["heldout_masks"] == 1
    assert 0.0 <= result["miou_before"] <= 1.0 and 0.0 <= result["miou_after"] <= 1.0
    assert (
        result["encoder_changed"] is False and engine.fingerprint == fingerprint
    )  # frozen: cache stays valid
    after = engine.model.mask_decoder.state_dict()
    assert any(not np.allclose(before[k].numpy(), after[k].numpy()) for k in before)  # new weights served
    held = result["heldout_images"][0]
    train_urls = yaml.safe_load((tmp_path / "out" / "retrain" / "round_001" / "data.yaml").read_text())
    assert str(store.shard_path(held).resolve()) not in train_urls["data"]["init_args"]["train_urls"]
    r = client.post("/api/predict", json={"image": "img0.png", "points": [[60, 40, 1]]}).json
    assert r["model_round"] == 1
    history = json.loads((tmp_path / "out" / "retrain" / "history.json").read_text())
    assert history == status["retrain"]["history"]
    # A restarted session serves the retrained weights.
    engine2, *_ = session(tmp_path)
    assert engine2.model_round == 1
