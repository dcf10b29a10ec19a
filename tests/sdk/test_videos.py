"""OpenAI's Videos API through easel with the official Python SDK, unchanged: create, poll, retrieve, list,
download the content and the thumbnail, delete; with keys, another key cannot see the video."""

import io

import openai
import pytest
from openai import OpenAI

from test_sdk import admin_create_key


def client_for(easel, key="unused"):
    return OpenAI(base_url=easel.url + "/v1", api_key=key, max_retries=0)


def test_create_poll_download_list_delete(easel):
    client = client_for(easel)
    video = client.videos.create_and_poll(model="sim-video", prompt="a fox in the snow", seconds="2", size="64x36",
                                          poll_interval_ms=50)
    assert video.object == "video"
    assert video.status == "completed", video
    assert video.progress == 100
    assert video.seconds == "2" and video.size == "64x36"
    again = client.videos.retrieve(video.id)
    assert again.id == video.id and again.status == "completed"

    content = client.videos.download_content(video.id)
    data = content.read()
    assert data[:6] in (b"GIF89a", b"GIF87a"), data[:16]
    thumb = client.videos.download_content(video.id, variant="thumbnail").read()
    assert thumb.startswith(b"\x89PNG")

    listed = client.videos.list(limit=100)
    assert video.id in [v.id for v in listed.data]

    deleted = client.videos.delete(video.id)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_bad_video_requests_raise_the_sdks_errors(easel):
    client = client_for(easel)
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(model="sim-video", prompt="p", seconds="99")
    assert e.value.body["param"] == "seconds"
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(model="easel-sim", prompt="p")
    assert "image" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("video_00000000000000000000000000000000")


def test_with_keys_a_video_is_its_owners(easel_keys):
    alice = admin_create_key(easel_keys, "video-alice", 10)
    bob = admin_create_key(easel_keys, "video-bob", 10)
    mine = client_for(easel_keys, alice).videos.create_and_poll(model="sim-video", prompt="p", seconds="1",
                                                               poll_interval_ms=50)
    assert mine.status == "completed"
    with pytest.raises(openai.NotFoundError):
        client_for(easel_keys, bob).videos.retrieve(mine.id)
    assert client_for(easel_keys, bob).videos.list().data == []


def test_a_webhook_url_goes_through_extra_body(easel):
    client = client_for(easel)
    # The target is checked before anything is held: a private address is refused by default.
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(model="sim-video", prompt="p", seconds="1",
                             extra_body={"webhook_url": "http://169.254.169.254/latest"})
    assert e.value.body["param"] == "webhook_url"
    assert "allow_private" in e.value.message
    # A public one is taken; the job runs as usual (its event waits in the outbox until the target answers).
    video = client.videos.create_and_poll(model="sim-video", prompt="p", seconds="1", poll_interval_ms=50,
                                          extra_body={"webhook_url": "https://hooks.example.com/easel"})
    assert video.status == "completed", video
