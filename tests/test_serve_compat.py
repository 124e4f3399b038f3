"""The OpenAI- and Ollama-compatible endpoints of `edgecap serve`, driven by the real clients.

One keyed server on 127.0.0.1 with a tiny random-weight model. Every client (the `openai` and
`ollama` packages, plain `requests`) must get exactly what `edgecap caption IMG` prints, in the
request shapes Frigate and Home Assistant's LLM Vision send.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import socket

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
requests = pytest.importorskip("requests")

from edgecap import Captioner
from edgecap.cli.main import main
from edgecap.serve.compat import CompatError, inline_image, model_ids, style_of
from test_serve_security import AUTH, KEY, key_file, stop_and_read_stderr  # noqa: F401
from test_server import Server

PROMPT = "Describe the object in these frames in one sentence."
# Shipped photos whose captions by the tiny model differ in text and length (the first one runs
# to the token cap, the last one is a single token).
FRAME_PHOTOS = (2, 4, 5, 0)


@pytest.fixture(scope="module")
def server(tiny_export, key_file):  # noqa: F811 - key_file is the fixture
    srv = Server(tiny_export, "--api-key-file", str(key_file))
    yield srv
    stop_and_read_stderr(srv)  # asserts no traceback


@pytest.fixture(scope="module")
def frame_paths(photos) -> list:
    return [photos[i] for i in FRAME_PHOTOS]


@pytest.fixture(scope="module")
def frames(frame_paths) -> list[bytes]:
    """Four JPEGs, like the frames Frigate sends of one tracked object."""
    return [path.read_bytes() for path in frame_paths]


@pytest.fixture(scope="module")
def cli_captions(tiny_export, frame_paths) -> list[str]:
    """What `edgecap caption --model M IMG` prints for each frame, one run per image."""
    captions = []
    for path in frame_paths:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["caption", "--model", str(tiny_export), str(path)]) == 0
        captions.append(out.getvalue().removesuffix("\n"))
    assert len(set(captions)) == len(captions)  # distinct, so a joined answer shows its order
    return captions


def joined(captions: list[str]) -> str:
    """The documented answer for several images: distinct captions in order, one a line."""
    return "\n".join(dict.fromkeys(c for c in captions if c))


def data_url(image: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(image).decode()


def frigate_content(images: list[bytes]) -> list:
    """Frigate's OpenAI provider: image parts with detail low, then the prompt as a bare string."""
    parts: list = [{"type": "image_url", "image_url": {"url": data_url(im), "detail": "low"}}
                   for im in images]
    return parts + [PROMPT]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ollama_client(server):
    return ollama.Client(host=server.url, headers=AUTH, timeout=60)


def batch_histogram(url: str) -> tuple[float, float]:
    """(count, sum) of edgecap_batch_size: micro-batches run and images in them."""
    text = requests.get(url + "/metrics", timeout=30).text
    count = re.search(r"^edgecap_batch_size_count (\S+)$", text, re.MULTILINE).group(1)
    total = re.search(r"^edgecap_batch_size_sum (\S+)$", text, re.MULTILINE).group(1)
    return float(count), float(total)


# ------------------------------------------------------------------------------------ OpenAI


def test_openai_frigate_shape_gives_the_cli_caption(client, frames, cli_captions):
    reply = client.chat.completions.create(
        model="edgecap", messages=[{"role": "user", "content": frigate_content(frames[:1])}])
    assert reply.choices[0].message.content == cli_captions[0]
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.model == "edgecap" and reply.object == "chat.completion"
    extra = reply.model_extra["edgecap"]["results"]
    assert reply.usage.completion_tokens == len(extra[0]["token_ids"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_text_first_and_sampling_options(client, frames, cli_captions):
    # LLM Vision's shape: a text part first, then the image; temperature and top_p are ignored
    # (decoding is deterministic), and max_tokens above the caption's length changes nothing.
    content = [{"type": "text", "text": PROMPT},
               {"type": "image_url", "image_url": {"url": data_url(frames[1])}}]
    reply = client.chat.completions.create(
        model="edgecap", messages=[{"role": "system", "content": "You are a camera."},
                                   {"role": "user", "content": content}],
        temperature=0.9, top_p=0.5, max_tokens=300)
    assert reply.choices[0].message.content == cli_captions[1]


def test_openai_several_frames_are_one_batch(server, client, frames, cli_captions):
    # A repeated frame adds no line: the answer is the distinct captions in frame order.
    before = batch_histogram(server.url)
    reply = client.chat.completions.create(
        model="edgecap", messages=[{"role": "user", "content": frigate_content(frames + frames[:1])}])
    after = batch_histogram(server.url)
    assert reply.choices[0].message.content == "\n".join(cli_captions)
    results = reply.model_extra["edgecap"]["results"]
    assert [r["generated_text"] for r in results] == cli_captions + cli_captions[:1]
    assert (after[0] - before[0], after[1] - before[1]) == (1, 5)  # one batch of five images


def test_openai_streamed(client, frames, cli_captions):
    chunks = list(client.chat.completions.create(
        model="edgecap", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": frigate_content(frames[2:3])}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == cli_captions[2]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_openai_stream_ends_with_done(server, frames):
    body = {"model": "edgecap", "stream": True,
            "messages": [{"role": "user", "content": frigate_content(frames[:1])}]}
    reply = requests.post(server.url + "/v1/chat/completions", json=body, headers=AUTH,
                          timeout=60)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.text.endswith("data: [DONE]\n\n")
    assert reply.headers["x-edgecap-prompt"] == "ignored"


def test_openai_token_cap(client, frames, cli_captions):
    # max_completion_tokens caps the caption: its first two tokens, cut for length.
    reply = client.chat.completions.create(
        model="edgecap", max_completion_tokens=2,
        messages=[{"role": "user", "content": frigate_content(frames[:1])}])
    assert len(reply.model_extra["edgecap"]["results"][0]["token_ids"]) == 2
    assert cli_captions[0].startswith(reply.choices[0].message.content)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2
    uncapped = client.chat.completions.create(
        model="edgecap", messages=[{"role": "user", "content": frigate_content(frames[3:])}])
    assert uncapped.choices[0].finish_reason == "stop"


def test_openai_models(client):
    assert "edgecap" in [model.id for model in client.models.list()]
    assert client.models.retrieve("edgecap").id == "edgecap"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_edgecap_options_travel_in_extra_body(client, tiny_export, frame_paths, frames):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["caption", "--model", str(tiny_export), "--beams", "2",
                     "--max-new-tokens", "5", str(frame_paths[1])]) == 0
    reply = client.chat.completions.create(
        model="edgecap", messages=[{"role": "user", "content": frigate_content(frames[1:2])}],
        extra_body={"num_beams": 2, "max_new_tokens": 5})
    assert reply.choices[0].message.content == out.getvalue().removesuffix("\n")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="edgecap", messages=[{"role": "user", "content": frigate_content(frames[:1])}],
            extra_body={"num_beams": 0})
    assert "num_beams" in caught.value.message


def test_requests_llama_cpp_shape(server, frames, cli_captions):
    # llama.cpp's server shape: no model name, text then image, a generous n_predict budget.
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": PROMPT},
        {"type": "image_url", "image_url": {"url": data_url(frames[3])}}]}],
        "max_tokens": 512, "temperature": 0.1}
    reply = requests.post(server.url + "/v1/chat/completions", json=body, headers=AUTH,
                          timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == cli_captions[3]


@pytest.mark.parametrize("option", [
    {"n": 2},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"response_format": {"type": "json_schema",
                         "json_schema": {"name": "x", "schema": {"type": "object"}}}},
    {"logprobs": True},
])
def test_openai_unsupported_option_is_named(client, frames, option):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="edgecap", messages=[{"role": "user", "content": frigate_content(frames[:1])}],
            **option)
    name = next(iter(option))
    assert caught.value.status_code == 400
    assert caught.value.param == name and caught.value.code == "unsupported_option"
    assert name in caught.value.message


# ------------------------------------------------------------------------------------ Ollama


def test_ollama_show_list_version(server, ollama_client):
    shown = ollama_client.show("edgecap")
    assert "vision" in shown.capabilities and shown.details.format == "onnx"
    assert "edgecap:latest" in [model.model for model in ollama_client.list().models]
    version = requests.get(server.url + "/api/version", headers=AUTH, timeout=30).json()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version["version"])
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.show("llava")
    assert caught.value.status_code == 404


def test_ollama_generate_frigate_shape(ollama_client, frames, cli_captions, tiny_export,
                                       frame_paths):
    # Frigate's Ollama provider: generate(model, prompt, images=[bytes]), not streamed.
    reply = ollama_client.generate("edgecap", PROMPT, images=frames[:1], stream=False)
    assert reply.response == cli_captions[0]
    assert reply.done and reply.done_reason in ("stop", "length")
    assert reply.eval_count == len(Captioner(tiny_export).caption(frame_paths[0]).token_ids)
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration > 0
    several = ollama_client.generate("edgecap", PROMPT, images=frames, stream=False)
    assert several.response == joined(cli_captions)


def test_ollama_generate_streamed(ollama_client, frames, cli_captions):
    parts = list(ollama_client.generate("edgecap:latest", PROMPT, images=frames[1:2],
                                        stream=True))
    assert "".join(part.response for part in parts) == cli_captions[1]
    assert [part.done for part in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].done_reason in ("stop", "length") and parts[-1].eval_count > 0


def test_ollama_chat(ollama_client, frames, cli_captions):
    messages = [{"role": "user", "content": PROMPT, "images": frames[2:3]}]
    reply = ollama_client.chat("edgecap", messages=messages, stream=False)
    assert reply.message.role == "assistant" and reply.message.content == cli_captions[2]
    parts = list(ollama_client.chat("edgecap", messages=messages, stream=True))
    assert "".join(part.message.content for part in parts) == cli_captions[2]
    assert parts[-1].done and parts[-1].eval_duration > 0


def test_ollama_streams_ndjson_by_default(server, frames, cli_captions):
    body = {"model": "edgecap", "prompt": PROMPT,
            "images": [base64.b64encode(frames[0]).decode()]}
    reply = requests.post(server.url + "/api/generate", json=body, headers=AUTH, timeout=60)
    assert reply.headers["content-type"].startswith("application/x-ndjson")
    lines = [line for line in reply.text.splitlines() if line]
    assert len(lines) == 2 and '"done": true' in lines[-1]
    load = requests.post(server.url + "/api/generate", json={"model": "edgecap"}, headers=AUTH,
                         timeout=60).json()
    assert load["done"] and load["done_reason"] == "load"


def test_ollama_unsupported_format(ollama_client, frames):
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.generate("edgecap", PROMPT, images=frames[:1], format="json", stream=False)
    assert caught.value.status_code == 400 and "format" in caught.value.error


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("method,path", [("post", "/v1/chat/completions"),
                                         ("get", "/v1/models"), ("post", "/api/generate"),
                                         ("post", "/api/chat"), ("get", "/api/tags"),
                                         ("post", "/api/show")])
def test_no_key_is_401(server, method, path):
    reply = requests.request(method, server.url + path, json={"model": "edgecap"}, timeout=30)
    assert reply.status_code == 401 and reply.json()["error"] == "unauthorized"


def test_wrong_key_with_the_real_clients(server, frames):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="x" * 32, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(
            model="edgecap", messages=[{"role": "user", "content": frigate_content(frames[:1])}])
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=server.url).generate("edgecap", PROMPT, images=frames[:1])
    assert caught.value.status_code == 401


@pytest.fixture
def loopback_listener():
    """A listening socket on 127.0.0.1: a server that fetched an image URL would connect."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        sock.settimeout(0.5)
        yield sock


def assert_never_contacted(listener: socket.socket) -> None:
    with pytest.raises(socket.timeout):
        listener.accept()


def test_remote_url_is_refused_and_never_fetched(server, client, loopback_listener):
    url = f"http://127.0.0.1:{loopback_listener.getsockname()[1]}/frame.jpg"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="edgecap", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, PROMPT]}])
    assert caught.value.code == "remote_image"
    reply = requests.post(server.url + "/api/generate", headers=AUTH, timeout=30,
                          json={"model": "edgecap", "prompt": PROMPT, "images": [url]})
    assert reply.status_code == 400 and "not fetched" in reply.json()["error"]
    assert_never_contacted(loopback_listener)


@pytest.mark.parametrize("payload,status,code", [
    ("data:image/jpeg;base64,@@not base64@@", 400, "bad_base64"),
    (data_url(b"this is not an image"), 422, "bad_image"),
])
def test_bad_images_are_4xx_json(server, payload, status, code):
    chat = {"model": "edgecap", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": payload}}]}]}
    reply = requests.post(server.url + "/v1/chat/completions", json=chat, headers=AUTH,
                          timeout=30)
    assert reply.status_code == status and reply.json()["error"]["code"] == code
    bare = payload.partition(",")[2]
    reply = requests.post(server.url + "/api/chat", headers=AUTH, timeout=30, json={
        "model": "edgecap", "messages": [{"role": "user", "content": "", "images": [bare]}]})
    assert reply.status_code == status and reply.json()["error"]


def test_image_limit_is_the_services(client, frames):
    # --max-images bounds a chat request as it bounds /v1/captions' multipart files.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="edgecap", messages=[
            {"role": "user", "content": frigate_content((frames * 3)[:9])}])
    assert "at most 8 images" in caught.value.message


def test_no_image_and_unknown_model(server, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="edgecap",
                                       messages=[{"role": "user", "content": PROMPT}])
    assert "no image" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                  "content": PROMPT}])


def test_openapi_lists_the_compatible_routes(server):
    paths = requests.get(server.url + "/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/models", "/v1/chat/completions", "/api/tags", "/api/show", "/api/version",
            "/api/generate", "/api/chat"} <= set(paths)
    assert paths["/v1/chat/completions"]["post"]["security"] == [{"apiKey": []}]


def test_model_ids_name_styles():
    assert model_ids(["alt-text"]) == ["edgecap", "edgecap:alt-text"]
    assert style_of("edgecap", ["alt-text"]) is None
    assert style_of("edgecap:latest", ["alt-text"]) is None
    assert style_of("edgecap:alt-text", ["alt-text"]) == "alt-text"
    for model, status in (("edgecap:poem", 404), ("llava:7b", 404), (None, 400), ("", 400)):
        with pytest.raises(CompatError) as caught:
            style_of(model, ["alt-text"])
        assert caught.value.status == status and caught.value.param == "model"


@pytest.mark.parametrize("reference,kind", [
    ("https://camera.local/snapshot.jpg", "remote_image"),
    ("FTP://10.0.0.1/x.jpg", "remote_image"),
    ("data:image/jpeg,%FF%D8", "bad_image"),  # a data URL that is not base64
    ("data:image/jpeg;base64,a$b=", "bad_base64"),
    (42, "bad_image"),
])
def test_inline_image_refusals(reference, kind):
    with pytest.raises(CompatError) as caught:
        inline_image(reference, "images[0]")
    assert caught.value.status == 400 and caught.value.kind == kind
    assert caught.value.message.startswith("images[0]")


def test_inline_image_accepts_wrapped_base64():
    text = base64.encodebytes(b"\xff\xd8 jpeg bytes").decode()  # line breaks every 76 chars
    assert inline_image("data:image/jpeg;base64," + text, "x") == b"\xff\xd8 jpeg bytes"
    assert inline_image(text, "x") == b"\xff\xd8 jpeg bytes"
