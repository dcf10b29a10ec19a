"""easel driven by the official OpenAI Python SDK, as users run it."""

import base64
import json
import struct
import threading
import urllib.request
import uuid

import openai
import pytest
from openai import OpenAI

from conftest import ADMIN, wait_until


def client(e, key="unused", retries=2):
    return OpenAI(base_url=e.url + "/v1", api_key=key, max_retries=retries, timeout=60)


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_generate_url_default(easel):
    img = client(easel).images.generate(model="easel-sim", prompt="a red apple")
    url = img.data[0].url
    assert url.startswith(easel.url)
    status, headers, body = easel.get(url[len(easel.url):])
    assert status == 200 and headers["content-type"] == "image/png"
    assert png_size(body) == (64, 64)


def test_generate_b64_sizes_and_n(easel):
    img = client(easel).images.generate(model="easel-sim", prompt="p", n=3, size="256x256", response_format="b64_json")
    blobs = [base64.b64decode(d.b64_json) for d in img.data]
    assert len(blobs) == 3 and len(set(blobs)) == 3
    assert all(png_size(b) == (256, 256) for b in blobs)


def test_extensions_through_extra_body(easel):
    c = client(easel)
    one = c.images.generate(model="easel-sim", prompt="p", response_format="b64_json", extra_body={"seed": 7, "negative_prompt": "x"})
    two = c.images.generate(model="easel-sim", prompt="p", response_format="b64_json", extra_body={"seed": 7, "negative_prompt": "x"})
    other = c.images.generate(model="easel-sim", prompt="p", response_format="b64_json", extra_body={"seed": 8})
    assert one.data[0].b64_json == two.data[0].b64_json
    assert one.data[0].b64_json != other.data[0].b64_json


def test_output_format_jpeg(easel):
    img = client(easel).images.generate(model="easel-sim", prompt="p", response_format="b64_json", output_format="jpeg")
    assert base64.b64decode(img.data[0].b64_json)[:3] == b"\xff\xd8\xff"


def test_models(easel):
    c = client(easel)
    ids = [m.id for m in c.models.list()]
    assert "easel-sim" in ids
    m = c.models.retrieve("easel-sim")
    assert m.id == "easel-sim" and m.owned_by == "easel"


def test_unknown_model_is_not_found_with_a_suggestion(easel):
    with pytest.raises(openai.NotFoundError) as e:
        client(easel, retries=0).images.generate(model="easel-sm", prompt="p")
    assert e.value.body["code"] == "model_not_found"
    assert "easel-sim" in e.value.message


def test_bad_size_is_a_bad_request_naming_the_param(easel):
    with pytest.raises(openai.BadRequestError) as e:
        client(easel, retries=0).images.generate(model="easel-sim", prompt="p", size="huge")
    assert e.value.body["param"] == "size"


def test_failing_backend_is_an_internal_server_error(easel):
    with pytest.raises(openai.InternalServerError) as e:
        client(easel, retries=0).images.generate(model="broken-sim", prompt="p")
    assert e.value.status_code == 502
    assert "CUDA out of memory" in e.value.message


def test_busy_backend_is_a_rate_limit_with_retry_after(easel):
    c = client(easel, retries=0)
    done = {}
    first = threading.Thread(target=lambda: done.setdefault("r", c.images.generate(model="slow-sim", prompt="p")))
    first.start()

    def inflight():
        _, _, body = easel.get("/v1/gateway/status")
        return json.loads(body)["backends"]["slow"]["admission"]["images"]["inflight"] == 1

    wait_until("the first request in flight", inflight)
    with pytest.raises(openai.RateLimitError) as e:
        c.images.generate(model="slow-sim", prompt="p")
    assert int(e.value.response.headers["retry-after"]) >= 1
    first.join(timeout=30)
    assert done["r"].data


def test_healthz(easel):
    status, _, body = easel.get("/healthz")
    assert (status, body) == (200, b"ok")


def admin_create_key(e, name, credits, models=None):
    req = urllib.request.Request(
        e.url + "/v1/admin/keys",
        data=json.dumps({"name": name, "credits": credits, "models": models}).encode(),
        headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["secret"]


def test_keys_typed_exceptions_and_idempotency(easel_keys):
    e = easel_keys
    with pytest.raises(openai.AuthenticationError) as err:
        client(e, key="sk-easel-wrong", retries=0).images.generate(model="easel-sim", prompt="p")
    assert err.value.body["code"] == "invalid_api_key"

    limited = admin_create_key(e, "sdk-limited", 5, ["slow-sim"])
    with pytest.raises(openai.PermissionDeniedError) as err:
        client(e, key=limited, retries=0).images.generate(model="easel-sim", prompt="p")
    assert err.value.body["code"] == "model_not_allowed"

    key = admin_create_key(e, "sdk-buyer", 2)
    c = client(e, key=key, retries=0)
    idem = {"Idempotency-Key": str(uuid.uuid4())}
    first = c.images.with_raw_response.generate(model="easel-sim", prompt="p", response_format="b64_json", extra_headers=idem)
    again = c.images.with_raw_response.generate(model="easel-sim", prompt="p", response_format="b64_json", extra_headers=idem)
    assert again.headers.get("idempotent-replayed") == "true"
    assert first.parse().data[0].b64_json == again.parse().data[0].b64_json
    _, _, me = e.get("/v1/me", {"authorization": f"Bearer {key}"})
    assert json.loads(me)["credits"]["available"] == "1", "charged once"

    with pytest.raises(openai.APIStatusError) as err:
        c.images.generate(model="easel-sim", prompt="p", n=2)
    assert err.value.status_code == 402
    assert err.value.body["code"] == "insufficient_credits"
    assert "balance is 1 credits" in err.value.message


def test_an_image_job_through_the_sdks_own_request_methods(easel):
    c = client(easel)
    job = c.post(
        "/images/generations",
        cast_to=dict,
        body={"model": "easel-sim", "prompt": "a lighthouse", "n": 2, "response_format": "b64_json"},
        options={"headers": {"Prefer": "respond-async"}},
    )
    assert job["object"] == "job" and job["status"] == "queued", job
    seen = {}

    def done():
        seen["job"] = c.get(f"/jobs/{job['id']}", cast_to=dict)
        return seen["job"]["status"] in ("completed", "failed")

    wait_until("the image job ends", done)
    result = seen["job"]["result"]
    assert seen["job"]["status"] == "completed", seen["job"]
    assert len(result["data"]) == 2
    assert png_size(base64.b64decode(result["data"][0]["b64_json"])) == (64, 64)


def tiny_png():
    # A 1x1 opaque PNG; the simulated backend resizes inputs to the asked size.
    return base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
    )


def test_create_variation_through_an_alias(easel):
    img = client(easel).images.create_variation(
        image=("in.png", tiny_png(), "image/png"), model="dall-e-2", n=2, size="256x256", response_format="b64_json"
    )
    assert len(img.data) == 2
    assert all(png_size(base64.b64decode(d.b64_json)) == (256, 256) for d in img.data)
    assert img.size == "256x256"


def test_variation_of_a_model_that_cannot_edit_is_a_bad_request(easel):
    with pytest.raises(openai.BadRequestError) as err:
        client(easel).images.create_variation(image=("in.png", tiny_png(), "image/png"), model="sim-video")
    assert "sim-video" in err.value.message


def test_gpt_image_1_alias_reads_quality_and_usage(easel):
    img = client(easel).images.generate(model="gpt-image-1", prompt="a fox", quality="low", response_format="b64_json")
    assert img.quality == "low"
    assert img.background == "opaque"
    assert img.output_format == "png"
    assert img.usage is None, "the simulated backend reports no token usage, so none is invented"
