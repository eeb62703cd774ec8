"""annotate.py, the labelling page. Two tiers: the server through plain HTTP (its validation, its security, no label
lost under SIGKILL or concurrent clients), always; and the page in a real headless browser, where the simulated
annotator (data/annotators.py) labels each form with keystrokes and clicks, the exports train the scripts, and a
reward model learns from a few hundred pairs made there. The browser tier needs Debian's chromium and
chromium-driver and selenium (.ci/run installs them); without them it is skipped, saying so."""

import http.client
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import annotate
from conftest import ENV, ROOT, WORLD, read_jsonl, run, run_side_by_side, write_jsonl
from data.annotators import answer, correction

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", shutil.which("chromedriver")),
           ("selenium", importlib.util.find_spec("selenium"))) if not found]  # fmt: skip
browser_tier = pytest.mark.skipif(
    bool(MISSING),
    reason=f"no {', '.join(MISSING)}: apt-get install chromium chromium-driver && "
    "pip install -r extras/requirements-browser.txt",
)
K = {"pairwise": 2, "ranking": 4, "rating": 3, "binary": 3}
XSS = ['<script>window.pwned = 1</script>', '<img src=x onerror="window.pwned = 1">',
       '"><svg onload="window.pwned = 1">', "</div><b>bold?</b> &amp; &lt;"]  # fmt: skip


# ---- helpers: items, a server, requests ----------------------------------------------------------------------
def make_items(out, n, k, chat_every=0, payloads=()):
    """An output directory of items as annotate.py saves them, from the world's held-out rankings (distinct texts),
    every chat_every-th prompt as chat messages; the payloads replace the first item's texts."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_jsonl(f"{WORLD}/ranking/test.jsonl") if len(set(r["responses"][:k])) == k][:n]
    items = []
    for i, r in enumerate(rows):
        prompt = r["prompt"]
        if chat_every and i % chat_every == 1:
            prompt = [{"role": "system", "content": "Continue the review."}, {"role": "user", "content": prompt}]
        items.append({"item": i, "prompt": prompt, "responses": r["responses"][:k]})
    if payloads:
        items[0]["prompt"] = [{"role": "system", "content": payloads[0]}, {"role": "user", "content": payloads[1]}]
        items[0]["responses"] = list(payloads[:k])
    write_jsonl(out / "items.jsonl", items)
    (out / "run.json").write_text(json.dumps({"script": "annotate.py", "args": {}}))
    return items


def serve(out, *args):
    """annotate.py serving out on a free port: {proc, port, token, url} once it has printed its address."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "annotate.py"), "--output_dir", str(out), "--port", "0", *map(str, args)],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("open http://"):
            url = line.split()[1]
            port, token = int(url.split(":")[2].split("/")[0]), url.split("token=")[1]
            return {"proc": proc, "port": port, "token": token, "url": url, "stdout": lines}
    raise AssertionError(f"annotate.py did not serve: {''.join(lines)}{proc.stderr.read()[-3000:]}")


def stop(server):
    """Kill the server (SIGKILL: nothing is done on the way out); its stderr."""
    server["proc"].kill()
    _, stderr = server["proc"].communicate()
    return stderr


@pytest.fixture
def servers():
    started = []
    yield lambda out, *args: started.append(serve(out, *args)) or started[-1]
    for s in started:
        if s["proc"].poll() is None:
            stop(s)


def call(server, method, path, body=None, token=True, headers=None):
    """(status, headers, parsed JSON or text) of one request to the server, as a browser on this machine sends it."""
    h = {"Host": f"127.0.0.1:{server['port']}"}
    if token:
        h["X-Token"] = server["token"] if token is True else token
    if body is not None and not isinstance(body, bytes):
        body, h["Content-Type"] = json.dumps(body).encode(), "application/json"
    h.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data, headers = r.read().decode(), dict(r.getheaders())
    conn.close()
    try:
        data = json.loads(data)
    except ValueError:
        pass
    return r.status, headers, data


def state(server, annotator="ann", client="c1"):
    status, _, data = call(server, "GET", f"/api/state?annotator={annotator}&client={client}")
    assert status == 200, data
    return data


def label_by_http(server, rng, annotator, client, items, form, n=None):
    """The simulated annotator through the API (as the page sends its labels): until nothing is left, or n labels.
    Returns the ids acknowledged."""
    acked = []
    while n is None or len(acked) < n:
        item = state(server, annotator, client)["item"]
        if item is None:
            break
        shown = [r["text"] for r in item["responses"]]
        label = api_label(form, answer(rng, form, shown), [r["id"] for r in item["responses"]])
        label_id = f"{client}-{len(acked)}-{rng.random():.12f}"[:80].replace(".", "_")
        body = {"id": label_id, "annotator": annotator, "client": client, "item": item["item"], "form": form}
        status, _, data = call(server, "POST", "/api/label", {**body, "label": label})
        assert status == 200 and data["written"], data
        acked.append(label_id)
    return acked


def api_label(form, a, ids):
    """An answer by positions shown as the label the page posts: by the responses' ids."""
    if form == "pairwise":
        return {"chosen": None if a is None else ids[a]}
    if form == "ranking":
        return {"order": [ids[p] for p in a]}
    by_id = [a[ids.index(r)] for r in range(len(ids))]
    return {"ratings": by_id} if form == "rating" else {"up": by_id}


def in_texts(form, a, texts):
    """An answer by positions (texts[p] at position p), or a logged label (texts[id]), in texts: comparable."""
    if form == "pairwise":
        return None if a is None else texts[a]
    return [texts[p] for p in a] if form == "ranking" else dict(zip(texts, a, strict=True))


def read_export(out):
    """{dataset: {split: rows}} of an export."""
    root = out / "export"
    return {
        d: {
            s: read_jsonl(root / d / f"{s}.jsonl") if (root / d / f"{s}.jsonl").exists() else []
            for s in ("train", "test")
        }
        for d in sorted(os.listdir(root))
        if (root / d).is_dir()
    }


def log_rows(out):
    path = out / "labels.jsonl"
    return read_jsonl(path) if path.exists() else []


# ---- validation, agreement: the functions -------------------------------------------------------------------
def test_label_validation_names_each_mistake():
    items = [{"item": 0, "prompt": "p", "responses": ["a", "b", "c"]}]
    ok = {"id": "x-1", "annotator": "Ann", "item": 0, "form": "rating", "label": {"ratings": [1, 4, 7]}}
    assert annotate.label_problem(ok, items, "rating") is None
    an_edit = {**ok, "client": "c", "form": "edit", "label": {"response": 2, "text": "d"}}
    assert annotate.label_problem(an_edit, items, "rating") is None
    bad = [
        ([], "not a JSON object"),
        ({**ok, "extra": 1}, "unknown"),
        ({k: v for k, v in ok.items() if k != "id"}, "missing"),  # fmt: skip
        ({**ok, "id": "a b"}, "'id'"),
        ({**ok, "annotator": "<b>x</b>"}, "'annotator'"),
        ({**ok, "item": 1}, "unknown item"),  # fmt: skip
        ({**ok, "item": True}, "unknown item"),
        ({**ok, "form": "pairwise"}, "not this page's"),
        ({**ok, "label": {"ratings": [1, 4, 8]}}, "1 to 7"),
        ({**ok, "label": {"ratings": [1, 4]}}, "1 to 7"),
        ({**ok, "label": {"ratings": [1, 4, 5.0]}}, "1 to 7"),
        ({**ok, "label": {"ratings": [1, 4, True]}}, "1 to 7"),
        ({**ok, "label": [1, 4, 7]}, "an object"),
        ({**ok, "label": {"ratings": [1, 4, 7], "x": 1}}, "an object"),
        ({**ok, "form": "edit", "label": {"response": 3, "text": "d"}}, "'response'"),
        ({**ok, "form": "edit", "label": {"response": 0, "text": "a"}}, "differs"),
        ({**ok, "form": "edit", "label": {"response": 0, "text": " "}}, "differs"),
    ]
    for body, words in bad:
        problem = annotate.label_problem(body, items, "rating")
        assert problem and words in problem and "\n" not in problem, (body, problem)
    for form, good, wrong in [
        (
            "pairwise",
            [{"chosen": 0}, {"chosen": 1}, {"chosen": None}],
            [{"chosen": 2}, {"chosen": True}, {"chosen": "0"}],
        ),  # fmt: skip
        ("ranking", [{"order": [2, 0, 1]}], [{"order": [0, 0, 1]}, {"order": [0, 1]}, {"order": "012"}]),
        ("binary", [{"up": [True, False, True]}], [{"up": [1, 0, 1]}, {"up": [True, False]}]),
    ]:
        two = [{"item": 0, "prompt": "p", "responses": ["a", "b"] if form == "pairwise" else ["a", "b", "c"]}]
        for label in good:
            assert annotate.label_problem({**ok, "form": form, "label": label}, two, form) is None, label
        for label in wrong:
            assert annotate.label_problem({**ok, "form": form, "label": label}, two, form), label


def test_agreement_counts_what_two_people_order_alike():
    # pairwise: two items, both annotators agree on the first, a choice against a tie on the second
    assert annotate.agreement("pairwise", {0: [[1, 0], [1, 0]], 1: [[1, 0], [0, 0]]}) == {"rate": 0.5, "comparisons": 2}
    # ranking of 3: orders 0>1>2 and 1>0>2 agree on (0, 2) and (1, 2), not (0, 1); a third person identical to the
    # first adds 3 agreements with the first and 2 with the second
    a, b = [annotate.scores("ranking", {"order": o}, 3) for o in ([0, 1, 2], [1, 0, 2])]
    assert annotate.agreement("ranking", {0: [a, b]}) == {"rate": 2 / 3, "comparisons": 3}
    assert annotate.agreement("ranking", {0: [a, b, a]}) == {"rate": 7 / 9, "comparisons": 9}
    # ratings: ties agree with ties only; thumbs: per response
    assert annotate.agreement("rating", {0: [[3, 3, 5], [2, 2, 7]]}) == {"rate": 1.0, "comparisons": 3}
    assert annotate.agreement("rating", {0: [[3, 3, 5], [2, 3, 7]]})["rate"] == 2 / 3
    assert annotate.agreement("binary", {0: [[True, False], [True, True]]}) == {"rate": 0.5, "comparisons": 2}
    assert annotate.agreement("binary", {0: [[True, False]]}) is None


def test_the_simulated_annotator_answers_each_form_by_the_gold_rater():
    """data/annotators.py's answers to what the page shows, positions as shown: the clearly better wins."""
    from data.gold import gold_score

    good, bad, rng = " I loved it. The acting is brilliant.", " I hated it. The plot is awful.", random.Random(0)
    assert sum(answer(rng, "pairwise", [bad, good]) == 1 for _ in range(100)) > 90
    assert answer(rng, "pairwise", [good, good]) is None  # the same text twice: a tie
    assert sum(answer(rng, "ranking", [bad, good, bad + bad])[0] == 1 for _ in range(100)) > 90
    ratings = [answer(rng, "rating", [good, bad]) for _ in range(100)]
    assert all(1 <= x <= 7 for r in ratings for x in r) and sum(g > b for g, b in ratings) > 90
    thumbs = [answer(rng, "binary", [good, bad]) for _ in range(100)]
    assert sum(g for g, _ in thumbs) > 90 and sum(b for _, b in thumbs) < 10
    text = " The acting was great. The plot was dull and boring. The acting was great. I loved the music."
    assert correction(text) == " The acting was great. I loved the music." and gold_score(
        correction(text)
    ) > gold_score(text)
    assert correction(good) is None and correction(bad) is None  # nothing to improve; nothing left


# ---- sampling -------------------------------------------------------------------------------------------------
def test_samples_are_saved_before_serving_and_reused(sft_model, tmp_path, servers):
    out = tmp_path / "labels"
    s = servers(out, "--model_name_or_path", sft_model, "--form", "ranking", "--num_responses", 3, "--num_prompts", 6)
    items = read_jsonl(out / "items.jsonl")
    prompts = [r["prompt"] for r in read_jsonl(f"{WORLD}/prompts/train.jsonl")[:6]]
    assert [r["item"] for r in items] == list(range(6)) and [r["prompt"] for r in items] == prompts
    assert all(len(r["responses"]) == 3 and all(isinstance(x, str) for x in r["responses"]) for r in items)
    assert len({x for r in items for x in r["responses"]}) > 12  # sampled, not one answer repeated
    assert state(s)["item"]["prompt"] in prompts
    assert "sampling: 100%" in stop(s)  # the progress bar
    before = (out / "items.jsonl").read_bytes()
    s = servers(out, "--model_name_or_path", "no/such/model", "--form", "rating")  # not loaded: the items are reused
    assert "serving the items sampled before" in "".join(s["stdout"])
    assert (out / "items.jsonl").read_bytes() == before


def test_mistakes_are_one_line_errors(tmp_path):
    """Items of 3 served pairwise, an export with no label yet, a corrupt log: each one line (argument ranges and an
    output directory of another script's are plumbing's checks, tested with the other scripts)."""
    from conftest import one_line_error

    make_items(tmp_path / "three", 4, 3)
    three = run("annotate.py", "--output_dir", tmp_path / "three", "--form", "pairwise", ok=False)
    one_line_error(three, "pairwise", "2")
    one_line_error(run("annotate.py", "--output_dir", tmp_path / "three", "--export", ok=False), "no label")
    (tmp_path / "three" / "labels.jsonl").write_text('{"id": "a"}\n')
    one_line_error(run("annotate.py", "--output_dir", tmp_path / "three", "--export", ok=False), "corrupt")


# ---- security ---------------------------------------------------------------------------------------------------
def test_token_host_and_paths(tmp_path, servers):
    out = tmp_path / "labels"
    make_items(out, 4, 3)
    s = servers(out, "--form", "rating")
    status, headers, page = call(s, "GET", f"/?token={s['token']}", token=False)
    assert status == 200 and "<script nonce=" in page and "script-src 'nonce-" in headers["Content-Security-Policy"]
    assert call(s, "GET", "/", token=True)[0] == 200  # the token as a header does too
    answers = [call(s, "GET", "/", token=False), call(s, "GET", "/?token=wrong", token=False)]
    answers += [call(s, "GET", "/api/state?annotator=a&client=c", token=t) for t in (False, "wrong", s["token"][:-1])]
    for host in ("evil.example", f"evil.example:{s['port']}", f"127.0.0.1.nip.io:{s['port']}", "127.0.0.1:1"):
        answers.append(call(s, "GET", f"/?token={s['token']}", token=False, headers={"Host": host}))
    assert [a[0] for a in answers] == [403] * 9
    assert all(isinstance(a[2], dict) and a[2]["error"] and "\n" not in a[2]["error"] for a in answers)
    for path in ["/items.jsonl", "/labels.jsonl", "/annotate.py", "/annotate.html", "/../annotate.py",
                 "/%2e%2e/annotate.py", "//etc/passwd", "/etc/passwd", "/api", "/api/state/../../annotate.py",
                 "/static/../../annotate.py", "/favicon.ico"]:  # fmt: skip
        assert call(s, "GET", path)[0] == 404, path
        assert call(s, "POST", path, b"{}", headers={"Content-Type": "application/json"})[0] == 404, path
    # no CORS: a preflight from another site is not granted, and no answer carries an Access-Control header
    asking = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    preflight = call(
        s, "OPTIONS", "/api/label", token=False, headers={**asking, "Access-Control-Request-Headers": "x-token"}
    )
    assert preflight[0] >= 400
    for _, headers, _ in [preflight, *answers, call(s, "GET", "/api/state?annotator=a&client=c")]:
        assert not [h for h in headers if h.lower().startswith("access-control")], headers


def test_cross_site_posts_and_bad_bodies_write_nothing(tmp_path, servers):
    out = tmp_path / "labels"
    make_items(out, 4, 3)
    s = servers(out, "--form", "rating")
    good = {"id": "g-1", "annotator": "ann", "item": 0, "form": "rating", "label": {"ratings": [1, 4, 7]}}
    # a page on another site posting, as a form or fetch() can without asking the browser first: no token
    evil = {"Origin": "http://evil.example", "Referer": "http://evil.example/"}
    for content_type, body in [
        ("text/plain", json.dumps(good)),
        ("application/x-www-form-urlencoded", "a=1"),
        ("multipart/form-data; boundary=x", "--x--"),
        ("application/json", json.dumps(good)),
    ]:
        headers = {**evil, "Content-Type": content_type}
        status, _, data = call(s, "POST", "/api/label", body.encode(), token=False, headers=headers)
        assert status == 403, data
    status, _, _ = call(s, "POST", "/api/undo", {"id": "u-1", "annotator": "ann"}, token=False, headers=evil)
    assert status == 403
    json_type = {"Content-Type": "application/json"}
    bad = [
        (b"{not json", json_type, 400),
        (b"\xff\xfe", json_type, 400),
        (b"[1, 2]", json_type, 400),
        (json.dumps({**good, "item": 99}).encode(), json_type, 400),
        (json.dumps({**good, "form": "pairwise", "label": {"chosen": 0}}).encode(), json_type, 400),
        (json.dumps({**good, "label": {"ratings": [1, 4, 8]}}).encode(), json_type, 400),
        (json.dumps({**good, "label": {"ratings": [0, 4, 7]}}).encode(), json_type, 400),
        (json.dumps({**good, "annotator": "<script>"}).encode(), json_type, 400),
        (json.dumps(good).encode(), {"Content-Type": "text/plain"}, 415),
        (json.dumps(good).encode(), {**json_type, "Content-Length": "70000"}, 413),
        (json.dumps({"id": "u 2", "annotator": "ann"}).encode(), json_type, 400),
    ]
    for body, headers, expected in bad:
        path = "/api/undo" if b'"u 2"' in body else "/api/label"
        status, _, data = call(s, "POST", path, body, headers=headers)
        assert status == expected and "\n" not in data["error"], (body, status, data)
    conn = http.client.HTTPConnection("127.0.0.1", s["port"], timeout=30)  # no Content-Length at all
    conn.putrequest("POST", "/api/label")
    for k, v in {"Host": f"127.0.0.1:{s['port']}", "X-Token": s["token"], **json_type}.items():
        conn.putheader(k, v)
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()
    assert not (out / "labels.jsonl").exists()  # nothing written by any of them
    assert call(s, "POST", "/api/label", good)[2] == {"written": True}
    assert call(s, "POST", "/api/label", {**good, "id": "g-2"})[0] == 409  # the same item twice: undo first
    assert [r["id"] for r in log_rows(out)] == ["g-1"]


# ---- no loss --------------------------------------------------------------------------------------------------
def test_sigkill_between_labels_loses_and_duplicates_nothing(tmp_path, servers):
    out = tmp_path / "labels"
    items = make_items(out, 30, 2)
    rng, acked = random.Random(0), []
    s = servers(out, "--form", "pairwise")
    for round_ in range(3):
        acked += label_by_http(s, rng, "ann", "c1", items, "pairwise", n=8)
        os.kill(s["proc"].pid, signal.SIGKILL)
        s["proc"].wait()
        if round_ == 1:  # killed while writing a line: half a row at the end of the log, never acknowledged
            with open(out / "labels.jsonl", "a") as f:
                f.write('{"id": "half", "annotator": "ann", "item": 29, "for')
        s = servers(out, "--form", "pairwise")
        assert f"{len(acked)} of 30 labels given" in "".join(s["stdout"])
        # the page retries the last label, not knowing it was written: acknowledged, not written twice
        last = next(r for r in log_rows(out) if r["id"] == acked[-1])
        body = {k: last[k] for k in ("id", "annotator", "item", "form", "label")}
        assert call(s, "POST", "/api/label", body)[2] == {"written": False, "duplicate": True}
        # it resumes where the annotator left off: an item not yet labelled
        assert state(s)["item"]["item"] not in {r["item"] for r in log_rows(out)}
    acked += label_by_http(s, rng, "ann", "c1", items, "pairwise")
    rows = log_rows(out)
    assert [r["id"] for r in rows] == acked and len(set(acked)) == 30
    assert sorted(r["item"] for r in rows) == list(range(30)) and state(s)["item"] is None
    # undo after a restart: the last label is taken back, and its item shown again
    status, _, data = call(s, "POST", "/api/undo", {"id": "undo-1", "annotator": "ann", "client": "c1"})
    assert status == 200 and data["undone"] == acked[-1] and state(s)["item"]["item"] == rows[-1]["item"]


def test_concurrent_clients_lose_nothing(tmp_path, servers):
    """Two people at once, each item to one of them: every item labelled once. Then six at once on every item (the
    log under contention), and the agreement of two against an independent count."""
    out = tmp_path / "one"
    items = make_items(out, 40, 2)
    s = servers(out, "--form", "pairwise")
    acked = {}

    def person(name, seed, server, items):
        acked[name] = label_by_http(server, random.Random(seed), name, f"client-{name}", items, "pairwise")

    threads = [threading.Thread(target=person, args=(f"p{n}", n, s, items)) for n in range(2)]
    [t.start() for t in threads], [t.join() for t in threads]
    rows = log_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(acked["p0"] + acked["p1"])
    assert sorted(r["item"] for r in rows) == list(range(40)) and min(len(acked["p0"]), len(acked["p1"])) > 5

    out = tmp_path / "six"
    items = make_items(out, 20, 2)
    s = servers(out, "--form", "pairwise", "--annotators_per_item", 6)
    acked.clear()
    threads = [threading.Thread(target=person, args=(f"p{n}", n, s, items)) for n in range(6)]
    [t.start() for t in threads], [t.join() for t in threads]
    rows = log_rows(out)  # every line whole JSON (read_jsonl parses each), every acknowledged label once
    assert sorted(r["id"] for r in rows) == sorted(sum(acked.values(), [])) and len(rows) == 120
    chosen = {}
    for r in rows:
        chosen.setdefault(r["item"], []).append(r["label"]["chosen"])
    pairs = [(a, b) for c in chosen.values() for i, a in enumerate(c) for b in c[i + 1 :]]
    want = sum(a == b for a, b in pairs) / len(pairs)
    got = state(s)["agreement"]
    assert got["comparisons"] == 20 * 15 and abs(got["rate"] - want) < 1e-12


# ---- the browser tier -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def driver():
    if MISSING:
        pytest.skip(f"no {', '.join(MISSING)}")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    d = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    yield d
    d.quit()


SHOWN = """const b = document.body;
return {item: b.dataset.item, busy: !!b.dataset.busy, status: document.getElementById("status").textContent,
        texts: [...document.querySelectorAll("#responses .text")].map(e => e.textContent),
        edits: [...document.querySelectorAll("#responses .edit")].map(e => e.textContent),
        turns: [...document.querySelectorAll("#prompt .turn")].map(e => e.textContent),
        progress: document.getElementById("progress").textContent};"""


def shown(driver, after=None):
    """What the page shows, once it shows an item other than `after` (or is done) and is not busy."""
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        s = d.execute_script(SHOWN)
        return s if s["item"] is not None and s["item"] != after and not s["busy"] else None

    return WebDriverWait(driver, 20, poll_frequency=0.01).until(ready)


def press(driver, *keys):
    from selenium.webdriver.common.by import By

    driver.find_element(By.TAG_NAME, "body").send_keys(*keys)


def click(driver, selector):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, selector).click()


def keys_for(form, a):
    """The keystrokes of an answer (positions as shown), before the Enter that submits it."""
    if form == "pairwise":
        return ["t" if a is None else str(a + 1)]
    return [str(p + 1) for p in a] if form == "ranking" else [str(x) if form == "rating" else "yn"[not x] for x in a]


def give(driver, form, a, by_keys):
    """The simulated annotator's answer `a` (positions as shown), given with keystrokes or with clicks."""
    from selenium.webdriver.common.keys import Keys

    if by_keys:
        return press(driver, *keys_for(form, a), *([Keys.ENTER] if form != "pairwise" else []))
    if form == "pairwise":
        return click(driver, f'button[data-choice="{"tie" if a is None else a}"]')
    for p, x in enumerate(a):
        click(driver, {"ranking": f'button[data-rank="{x}"]', "rating": f'button[data-pos="{p}"][data-rate="{x}"]',
                       "binary": f'button[data-pos="{p}"][data-up="{int(x)}"]'}[form])  # fmt: skip
    click(driver, 'button[data-action="submit"]')


def edit(driver, position, text, by_keys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    press(driver, "e", str(position + 1)) if by_keys else click(driver, f'button[data-edit="{position}"]')
    area = driver.find_element(By.TAG_NAME, "textarea")
    area.clear()
    area.send_keys(text)
    area.send_keys(Keys.CONTROL, Keys.ENTER) if by_keys else click(driver, 'button[data-action="save-edit"]')


def label_in_browser(driver, url, form, rng, edit_every=0, undo_at=None, screenshot=None):
    """The simulated annotator labels every item through the page: odd items by keystrokes, even ones by clicks;
    every edit_every-th item it also edits the response it can improve; at undo_at it labels, undoes, labels again.
    Returns {item: (texts shown, answer, prompt turns shown)} of the labels it gave last, and {item: (position,
    edited text)}."""
    driver.get(url)
    given, edits, previous = {}, {}, None
    while True:
        s = shown(driver, previous)
        if s["item"] == "":
            return given, edits
        item, by_keys = int(s["item"]), len(given) % 2 == 1
        if edit_every and len(given) % edit_every == 0:
            fix = next(((p, c) for p, t in enumerate(s["texts"]) if (c := correction(t))), None)
            if fix:
                edit(driver, *fix, by_keys=by_keys)
                edits[item] = fix
                s = shown(driver, None)
                assert fix[1] in s["edits"], s
        if screenshot and len(given) == 1:  # with half an answer on the screen, then taken back
            from selenium.webdriver.common.keys import Keys

            half = keys_for(form, answer(random.Random(1), form, s["texts"]))[:2] * (form != "pairwise")
            press(driver, *half) if half else None
            driver.save_screenshot(str(screenshot))
            press(driver, *[Keys.BACKSPACE] * len(half)) if half else None
        a = answer(rng, form, s["texts"])
        give(driver, form, a, by_keys)
        given[item] = (s["texts"], a, s["turns"])
        if undo_at is not None and len(given) == undo_at:
            s = shown(driver, str(item))
            press(driver, "u")
            s = shown(driver, s["item"])
            assert s["item"] == str(item)  # the undone item is shown again
            a = answer(rng, form, s["texts"])
            give(driver, form, a, not by_keys)
            given[item] = (s["texts"], a, s["turns"])
        previous = str(item)


@browser_tier
@pytest.mark.parametrize("form", ["pairwise", "ranking", "rating", "binary"])
def test_each_form_through_the_page(form, driver, tmp_path, servers, request):
    out = tmp_path / "labels"
    items = make_items(out, 10, K[form], chat_every=4)
    s = servers(out, "--form", form)
    given, edits = label_in_browser(
        driver, s["url"] + "&annotator=sim", form, random.Random(0), edit_every=3, undo_at=4,
        screenshot=tmp_path / f"{form}.png",
    )  # fmt: skip
    assert os.path.getsize(tmp_path / f"{form}.png") > 10_000
    # what the log holds, undone rows removed, is what the annotator answered to what the page showed
    rows = log_rows(out)
    undone = {r["label"]["undoes"] for r in rows if r["form"] == "undo"}
    live = [r for r in rows if r["form"] != "undo" and r["id"] not in undone]
    assert len(undone) == 1 and len(rows) == len(live) + 2  # one label undone: it and the undo stay in the log
    judged = {r["item"]: r for r in live if r["form"] == form}
    assert sorted(judged) == list(range(10)) and all(r["annotator"] == "sim" for r in live)
    for i, (texts, a, _) in given.items():
        logged = annotate.scores(form, judged[i]["label"], K[form]) if form in ("rating", "binary") else None
        logged = {"pairwise": judged[i]["label"].get("chosen"), "ranking": judged[i]["label"].get("order")}.get(
            form, logged
        )
        assert in_texts(form, logged, items[i]["responses"]) == in_texts(form, a, texts)
    edited = {r["item"]: r["label"] for r in live if r["form"] == "edit"}
    assert len(edited) >= 2 and edited.keys() == edits.keys()
    for i, (p, text) in edits.items():
        assert items[i]["responses"][edited[i]["response"]] == given[i][0][p] and edited[i]["text"] == text
    # a chat prompt is shown as its turns, a text prompt as one
    for i, (_, _, turns) in given.items():
        prompt = items[i]["prompt"]
        assert turns == ([m["role"] + m["content"] for m in prompt] if isinstance(prompt, list) else [prompt])
    assert any(isinstance(i["prompt"], list) for i in items)

    # the export, in the formats the scripts read
    run("annotate.py", "--output_dir", out, "--export")
    exported = read_export(out)
    results = json.load(open(out / "export" / "export.json"))
    k, n_edits = K[form], len(edits)
    ratings = [r["label"]["ratings"] for r in judged.values()] if form == "rating" else []
    pairs = {
        "pairwise": 10 - results["pairwise_ties"],
        "ranking": 10 * k * (k - 1) // 2,
        "rating": sum(x[r] != x[q] for x in ratings for r in range(k) for q in range(r + 1, k)),
        "binary": 0,
    }[form]
    expected = {"pairs": pairs + n_edits, "sft": n_edits, "rankings": 10 * (form == "ranking"),
                "ratings": 10 * k * (form == "rating"), "binary": 10 * k * (form == "binary")}  # fmt: skip
    assert {d: len(x["train"] + x["test"]) for d, x in exported.items()} == {d: n for d, n in expected.items() if n}
    prompts = {s: {json.dumps(r["prompt"]) for x in exported.values() for r in x[s]} for s in ("train", "test")}
    assert prompts["test"] and not prompts["test"] & prompts["train"]  # split by prompt
    exported = {d: x["train"] + x["test"] for d, x in exported.items()}
    for r in exported.get("sft", []):
        assert isinstance(r["completion"], list) == isinstance(r["prompt"], list)  # a chat reply to a chat prompt
    if form == "ranking":  # the rankings train reward.py (the pairs and edits: the round trip's test)
        sft_model = request.getfixturevalue("sft_model")
        run("reward.py", "--model_name_or_path", sft_model, "--dataset_name", out / "export" / "rankings",
            "--output_dir", tmp_path / "reward", "--max_steps", 2, "--batch_size", 4, "--micro_batch_size", 4,
            "--num_normalisation_rows", 16, "--gold_scorer", "None")  # fmt: skip
        assert json.load(open(tmp_path / "reward" / "eval.json"))["steps"] == 2


@browser_tier
def test_model_text_is_shown_as_text(driver, tmp_path, servers):
    out = tmp_path / "labels"
    make_items(out, 3, 3, payloads=XSS)
    s = servers(out, "--form", "rating")
    driver.get(s["url"])  # no name in the address: the page asks for one
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.find_element(By.ID, "name").send_keys("sim", Keys.ENTER)
    page = shown(driver)
    assert page["item"] == "0" and sorted(page["texts"]) == sorted(XSS[:3])
    assert page["turns"] == ["system" + XSS[0], "user" + XSS[1]]
    edit(driver, 0, XSS[3], by_keys=True)  # an edit holding HTML, shown back as text
    page = shown(driver)
    assert page["edits"] == [XSS[3]]
    time.sleep(0.5)
    assert driver.execute_script("return window.pwned") is None
    counts = driver.execute_script(
        "return ['#item script', '#item img', '#item svg', '#item b'].map(s => document.querySelectorAll(s).length)"
    )
    assert counts == [0, 0, 0, 0]
    # the textarea of the editor holds the text too
    press(driver, "e", "2")
    assert driver.find_element(By.TAG_NAME, "textarea").get_property("value") == page["texts"][1]
    driver.find_element(By.TAG_NAME, "textarea").send_keys(Keys.ESCAPE)


@browser_tier
def test_a_reward_model_learns_from_pairs_labelled_in_the_browser(driver, sft_model, tmp_path, servers):
    """The round trip: two samples of the SFT policy for each of 320 prompts, labelled pairwise through the page by
    the simulated annotator (editing the first response it can improve of every 16th item), exported; reward.py
    learns from the ~300 training pairs (40 steps of 32) and orders the world's 1,000 held-out pairs better than
    chance; dpo.py and sft.py (on the edits) run on the export. Over seeds 0-3 (annotate.py's, the annotator's and
    reward.py's) the held-out accuracy was 0.559-0.622 (gold agreement 0.563-0.622; the labels' own ceiling 0.899;
    a standard error of 0.016 at 1,000 pairs): asked here, above 0.53."""
    out, seed = tmp_path / "labels", 0
    s = servers(out, "--model_name_or_path", sft_model, "--num_prompts", 320, "--seed", seed)
    label_in_browser(driver, s["url"] + "&annotator=sim", "pairwise", random.Random(seed), edit_every=16)
    run("annotate.py", "--output_dir", out, "--export")
    data = out / "export"
    small = "--max_steps 2 --batch_size 8 --micro_batch_size 8 --eval_every 1000 --num_eval_prompts 8"
    run_side_by_side(
        f"reward.py --model_name_or_path {sft_model} --dataset_name {data}/pairs --eval_dataset_name "
        f"{WORLD}/preference --output_dir {tmp_path}/reward --max_steps 40 --num_epochs 5 --batch_size 32 "
        f"--micro_batch_size 32 --learning_rate 1e-3 --eval_every 1000 --num_normalisation_rows 64 --seed {seed} "
        "--num_eval_rows None",
        f"dpo.py --model_name_or_path {sft_model} --dataset_name {data}/pairs --output_dir {tmp_path}/dpo {small}",
        f"sft.py --model_name_or_path {sft_model} --dataset_name {data}/sft --output_dir {tmp_path}/sft {small}",
    )
    results = json.load(open(tmp_path / "reward" / "eval.json"))
    assert results["steps"] == 40 and results["rewards/accuracies"] > 0.53, results
    for script in ("dpo", "sft"):
        assert json.load(open(tmp_path / script / "eval.json"))["steps"] == 2
