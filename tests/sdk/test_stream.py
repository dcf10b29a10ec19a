"""Streamed image generation through the official OpenAI Python SDK: partial images, then the completed one."""

import base64
import struct

from openai import OpenAI


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_generate_stream_partial_images(easel):
    client = OpenAI(base_url=easel.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.images.generate(model="easel-sim", prompt="a red apple", stream=True, partial_images=2)
    events = list(stream)
    types = [e.type for e in events]
    assert types == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ], types
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events[:2]:
        # A real preview of the image being made: smaller than the final one.
        assert png_size(base64.b64decode(e.b64_json)) == (16, 16)
    done = events[-1]
    assert png_size(base64.b64decode(done.b64_json)) == (64, 64)
    assert done.size == "64x64" and done.output_format == "png"
    assert done.usage is None, "the simulated backend reports no token usage; none is invented"
