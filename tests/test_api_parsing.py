"""The API's request parsing and answer building, without a server: /v1/score, Perspective, spans, errors.

Property-based where the input comes from outside: any JSON value, and requests built from the real
field names with hostile values inside, either parse or raise ApiError with a 4xx status, never
anything else. What parses is what was sent, within every limit; each property counts its outcomes
and fails when parsing is barely reached. Examples are bounded for the suite; run longer with
`ESP_HYPOTHESIS_EXAMPLES=5000 .venv/bin/pytest tests/test_api_parsing.py`.
"""

from __future__ import annotations

import collections
import datetime as dt
import os
from collections.abc import Callable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from api import perspective as pv
from api.errors import ApiError
from api.native import parse_score_request
from api.spans import sentence_spans, utf16_len
from esp.contracts import MAX_ID_CHARS, Score
from esp.settings.api import ApiSettings
from esp.settings.contracts import CommentSettings
from tests.fixtures import perspective_docs as docs

EXAMPLES = int(os.environ.get("ESP_HYPOTHESIS_EXAMPLES", "200"))
JIGSAW = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
SETTINGS = ApiSettings(api_max_comments=4, api_max_text_bytes=100, api_max_spans=3)
COMMENTS = CommentSettings()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
ATTRIBUTES = pv.attribute_map(list(JIGSAW))


def mostly(valid: st.SearchStrategy, hostile: st.SearchStrategy = json_values) -> st.SearchStrategy:
    """`valid` nine times in ten, else `hostile`: a request of many fields still gets through often.
    (Valid is the branch Hypothesis shrinks towards and favours in its simplest examples.)"""
    return st.integers(0, 9).flatmap(lambda i: valid if i < 9 else hostile)


# Text as a JSON string can carry it: any code point, lone surrogates (a \ud800 escape) included.
any_text = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=40)
# Sentences for spanAnnotations, padded with whitespace the parser must keep (the score is of the text sent).
sentences = st.lists(st.text(st.characters(categories=["L", "N", "So"]), min_size=1, max_size=8), min_size=2, max_size=4).flatmap(
    lambda words: st.sampled_from([". ", "! ", "?\n", "…  ", "\n\n"]).map(lambda end: " " + end.join(words) + " ")
)
texts = mostly(
    sentences | st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=40),
    any_text | st.sampled_from(["", " \n", "é" * 51, "a" * 101, "\ud800", "A. B. C. D."]) | json_values,
)
ids = mostly(st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True), any_text | st.sampled_from(["", "x" * 257, "a\nb", "\x85"]) | json_values)
comment_objects = mostly(
    st.fixed_dictionaries({"text": texts}, optional={"id": ids}),
    st.fixed_dictionaries({}, optional={"id": ids, "text": texts, "lang": json_values}) | json_values,
)
many_comments = mostly(st.lists(comment_objects, min_size=1, max_size=5))
score_requests = comment_objects | mostly(
    st.fixed_dictionaries({"comments": many_comments}), st.fixed_dictionaries({"comments": many_comments, "id": ids})
)


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


@st.composite
def analyze_requests(draw: st.DrawFn) -> tuple[dict, dict]:
    """(the request as sent, the same with lowerCamelCase names): each field name in either spelling, as Google's parser takes them."""
    types = mostly(st.sampled_from(["PLAIN_TEXT", "TEXT_TYPE_UNSPECIFIED"]), st.sampled_from(["HTML", "MD"]) | json_values)
    entries = mostly(st.fixed_dictionaries({"text": texts}, optional={"type": types}))
    params = mostly(
        st.fixed_dictionaries({}, optional={
            "scoreType": mostly(st.sampled_from(["PROBABILITY", "SCORE_TYPE_UNSPECIFIED"]), st.sampled_from(["PERCENTILE", "RAW", "x"]) | json_values),
            "scoreThreshold": mostly(st.floats(0, 1), st.floats() | json_values),
        }) | st.none()
    )
    names = mostly(st.sampled_from(sorted(ATTRIBUTES)), st.sampled_from(["FLIRTATION", "toxicity", ""]) | any_text)
    canonical = draw(st.fixed_dictionaries(
        {
            "comment": entries,
            "requestedAttributes": mostly(st.dictionaries(names, params, min_size=1, max_size=4)),
            # Always there, or spans would be asked for in too few requests (an absent one is false, as null is).
            "spanAnnotations": mostly(st.sampled_from([True, False, None])),
        },
        optional={
            "languages": mostly(st.lists(mostly(st.sampled_from(["en", "en-GB", "EN_us", "de"]), st.sampled_from(["", " "]) | any_text), max_size=2)),
            "clientToken": mostly(any_text),
            "sessionId": mostly(any_text),
            "doNotStore": mostly(st.booleans()),
            "dropUnsupportedAttributes": mostly(st.booleans()),
            "context": mostly(st.fixed_dictionaries({}, optional={
                "entries": mostly(st.lists(entries, max_size=2)),
                "articleAndParentComment": mostly(st.fixed_dictionaries({}, optional={"article": entries, "parentComment": entries})),
            })),
        },
    ))
    if draw(st.integers(0, 19)) == 19:
        canonical["colour"] = draw(json_values)  # a field Perspective does not have
    wire = {}
    for name, value in canonical.items():
        if name == "requestedAttributes" and isinstance(value, dict):
            value = {a: {(_snake(k) if draw(st.booleans()) else k): v for k, v in p.items()} if isinstance(p, dict) else p for a, p in value.items()}
        wire[_snake(name) if draw(st.booleans()) else name] = value
    return wire, canonical


def _outcomes(strategy: st.SearchStrategy, check: Callable[..., str]) -> collections.Counter[str]:
    """Runs `check` on `EXAMPLES` draws of `strategy`, as a @given test would; returns how often it
    answered each outcome ("refused", "parsed" or "parsed ..."), so a test can show it reached them."""
    seen: collections.Counter[str] = collections.Counter()

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(strategy)
    def run(drawn: object) -> None:
        outcome = check(drawn)
        event(outcome)
        seen[outcome] += 1

    run()
    return seen


def _reached_both(seen: collections.Counter[str]) -> None:
    total = seen.total()
    parsed = sum(n for outcome, n in seen.items() if outcome.startswith("parsed"))
    assert parsed >= total // 10 and seen["refused"] >= total // 10, f"one branch is barely reached: {dict(seen)}"


def _score(probabilities: dict[str, float]) -> Score:
    return Score(
        id="x", probabilities=probabilities, thresholds={k: 0.5 for k in probabilities}, model_name="bert", model_version=1,
        truncated=False, scored_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    )


def _analyze(obj: object, labels=JIGSAW, **kw: object) -> pv.AnalyzeRequest:
    args = dict(attributes=pv.attribute_map(list(labels)), supported_languages=("en",), max_text_bytes=100, max_spans=3)
    args.update(kw)
    return pv.parse_analyze(obj, **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# /v1/score


def test_one_comment_and_many() -> None:
    one = parse_score_request({"id": "a", "text": "hello"}, SETTINGS, COMMENTS)
    assert not one.many and [(c.id, c.text) for c in one.comments] == [("a", "hello")]
    many = parse_score_request({"comments": [{"id": "a", "text": "x"}, {"text": "no id"}]}, SETTINGS, COMMENTS)
    assert many.many and many.comments[0].id == "a"
    assert many.comments[1].id.startswith("req-") and many.comments[1].id.endswith("-1")


@pytest.mark.parametrize(
    "body, status, reason",
    [
        ([1], 400, "not_an_object"),
        ({"id": "a"}, 400, "missing_text"),
        ({"id": "a", "text": "   "}, 400, "empty_text"),
        ({"id": "a", "text": 5}, 400, "non_string_text"),
        ({"id": 5, "text": "x"}, 400, "invalid_id"),
        ({"id": "", "text": "x"}, 400, "invalid_id"),
        ({"id": "a", "text": "x", "lang": "en"}, 400, "invalid_request"),
        ({"id": "a", "text": "\ud800"}, 400, "unencodable_text"),
        ({"id": "\udfff", "text": "a"}, 400, "unencodable_text"),
        ({"id": "a", "text": "é" * 51}, 413, "text_too_long"),
        ({"comments": []}, 400, "invalid_request"),
        ({"comments": {"text": "x"}}, 400, "invalid_request"),
        ({"comments": [{"text": "x"}] * 5}, 413, "too_many_comments"),
        ({"comments": [{"text": "x"}], "extra": 1}, 400, "invalid_request"),
        ({"comments": [{"text": "x"}, {"text": ""}]}, 400, "empty_text"),
    ],
)
def test_score_request_errors(body: object, status: int, reason: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_score_request(body, SETTINGS, COMMENTS)
    assert (err.value.status, err.value.reason) == (status, reason)
    assert err.value.message


def test_error_in_a_list_names_its_index() -> None:
    with pytest.raises(ApiError) as err:
        parse_score_request({"comments": [{"text": "ok"}, {"text": 1}]}, SETTINGS, COMMENTS)
    assert err.value.metadata == {"index": "1"}
    assert err.value.message.startswith("comments[1]: ")


def _score_outcome(value: object) -> str:
    try:
        request = parse_score_request(value, SETTINGS, COMMENTS)
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.reason and exc.message
        return "refused"
    assert 1 <= len(request.comments) <= SETTINGS.api_max_comments
    assert all(c.text.strip() and c.id for c in request.comments)
    # What parsed is what was sent, within every limit of the contract and the API.
    assert isinstance(value, dict) and request.many == ("comments" in value)
    items = value["comments"] if request.many else [value]
    assert len(request.comments) == len(items)
    for i, (item, comment) in enumerate(zip(items, request.comments)):
        assert comment.text == item["text"]
        if "id" in item:
            assert comment.id == item["id"]
        else:
            assert comment.id.startswith("req-") and comment.id.endswith(f"-{i}")
        assert len(comment.text.encode("utf-8")) <= SETTINGS.api_max_text_bytes
        comment.id.encode("utf-8")  # no lone surrogate
        assert len(comment.id) <= MAX_ID_CHARS
        assert not any(c < " " or "\x7f" <= c <= "\x9f" for c in comment.id), "a control character in an id"
    return "parsed"


def test_any_json_parses_or_is_refused_with_a_4xx() -> None:
    _reached_both(_outcomes(json_values | score_requests, _score_outcome))


# ---------------------------------------------------------------------------------------------
# Perspective: attributes, analyze


def test_attribute_names_come_from_the_models_labels() -> None:
    assert pv.attribute_map(list(JIGSAW)) == {
        "TOXICITY": "toxic", "SEVERE_TOXICITY": "severe_toxic", "PROFANITY": "obscene",
        "THREAT": "threat", "INSULT": "insult", "IDENTITY_ATTACK": "identity_hate",
    }
    # Other labels appear under their own upper-case names; nothing the model lacks is offered.
    assert pv.attribute_map(["toxic", "spam"]) == {"TOXICITY": "toxic", "SPAM": "spam"}
    # A label already called `toxicity` keeps its name; the alias then goes to nobody.
    assert pv.attribute_map(["toxic", "toxicity"]) == {"TOXIC": "toxic", "TOXICITY": "toxicity"}


def test_documented_analyze_example_round_trips_in_perspectives_shape() -> None:
    # The documented request, for a model that has both labels (`unsubstantial` is not a Jigsaw label).
    request = _analyze(docs.ANALYZE_REQUEST, labels=("toxic", "unsubstantial"))
    assert [(a.name, a.label, a.threshold) for a in request.attributes] == [("TOXICITY", "toxic", None), ("UNSUBSTANTIAL", "unsubstantial", None)]
    answer = pv.render_analyze(request, _score({"toxic": 0.86, "unsubstantial": 0.69}), [])
    expected = docs.shape(docs.ANALYZE_RESPONSE)
    assert docs.shape(answer["attributeScores"]["TOXICITY"]) == expected["attributeScores"]["TOXICITY"]  # type: ignore[index]
    assert answer["languages"] == docs.ANALYZE_RESPONSE["languages"]

    # With spanAnnotations, each attribute has the documented UNSUBSTANTIAL shape and the documented spans.
    spanned = _analyze({**docs.ANALYZE_REQUEST, "spanAnnotations": True}, labels=("toxic", "unsubstantial"))
    assert [(s.begin, s.end) for s in spanned.spans] == docs.ANALYZE_SPANS_PROSE
    assert spanned.span_texts() == ["What kind of idiot name is foo?", "Sorry, I like your name."]
    answer = pv.render_analyze(
        spanned, _score({"toxic": 0.86, "unsubstantial": 0.69}), [_score({"toxic": 0.9, "unsubstantial": 0.5}), _score({"toxic": 0.1, "unsubstantial": 0.9})]
    )
    assert docs.shape(answer["attributeScores"]["UNSUBSTANTIAL"]) == expected["attributeScores"]["UNSUBSTANTIAL"]  # type: ignore[index]
    assert [s["score"]["value"] for s in answer["attributeScores"]["TOXICITY"]["spanScores"]] == [0.9, 0.1]


def test_issue_example_has_exactly_the_expected_fields() -> None:
    request = _analyze({**docs.ISSUE_REQUEST, "comment": {"text": "You are a horrible person.", "type": "PLAIN_TEXT"}})
    answer = pv.render_analyze(request, _score({label: 0.92 for label in JIGSAW}), [])
    assert docs.shape(answer) == docs.shape(docs.ISSUE_RESPONSE)
    assert answer["clientToken"] == "abc" and answer["languages"] == ["en"]


def test_threshold_leaves_low_attributes_out() -> None:
    request = _analyze({"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {"scoreThreshold": 0.5}, "INSULT": {}}})
    answer = pv.render_analyze(request, _score({label: 0.2 for label in JIGSAW}), [])
    assert list(answer["attributeScores"]) == ["INSULT"]
    assert "clientToken" not in answer and answer["detectedLanguages"] == ["en"]


def test_snake_case_field_names_are_accepted_as_googles_parser_does() -> None:
    request = _analyze({"comment": {"text": "hi"}, "requested_attributes": {"TOXICITY": {"score_threshold": 0.1}}, "client_token": "t"})
    assert request.attributes[0].threshold == 0.1 and request.client_token == "t"


@pytest.mark.parametrize(
    "body, error_type, fragment",
    [
        ({"requestedAttributes": {"TOXICITY": {}}}, "COMMENT_EMPTY", "Comment must be non-empty."),
        ({"comment": {"text": " \n"}, "requestedAttributes": {"TOXICITY": {}}}, "COMMENT_EMPTY", "non-empty"),
        ({"comment": {"text": "x" * 101}, "requestedAttributes": {"TOXICITY": {}}}, "COMMENT_TOO_LONG", "too long"),
        ({"comment": {"text": "hi"}}, "NO_REQUESTED_ATTRIBUTES", "Missing requested_attributes"),
        ({"comment": {"text": "hi"}, "requestedAttributes": {}}, "NO_REQUESTED_ATTRIBUTES", "requested_attributes"),
        ({"comment": {"text": "hi"}, "requestedAttributes": {"FLIRTATION": {}}}, "INVALID_REQUEST", "Unknown requested attribute: FLIRTATION"),
        ({"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {"scoreType": "PERCENTILE"}}}, "INVALID_REQUEST", "score type PERCENTILE"),
        ({"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {"scoreThreshold": 2}}}, "INVALID_REQUEST", "between 0 and 1"),
        ({"comment": {"text": "hi", "type": "HTML"}, "requestedAttributes": {"TOXICITY": {}}}, "INVALID_REQUEST", "PLAIN_TEXT"),
        ({"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {}}, "colour": 1}, "INVALID_REQUEST", 'Unknown name "colour"'),
        ({"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {}}, "spanAnnotations": "yes"}, "INVALID_REQUEST", "true or false"),
        ({"comment": {"text": "A. B. C. D."}, "requestedAttributes": {"TOXICITY": {}}, "spanAnnotations": True}, "INVALID_REQUEST", "4 sentences"),
        (
            {"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {}}, "context": {"entries": [{"text": "a"}], "articleAndParentComment": {}}},
            "INVALID_REQUEST", "either entries or article_and_parent_comment",
        ),
    ],
)
def test_analyze_errors_use_perspectives_error_types(body: object, error_type: str, fragment: str) -> None:
    with pytest.raises(ApiError) as err:
        _analyze(body)
    assert err.value.status == 400 and err.value.perspective_type == error_type
    assert fragment in err.value.message
    wire = err.value.body(perspective=True)
    assert docs.shape(wire) == docs.shape(docs.COMMENT_EMPTY_ERROR) or error_type == "LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE"
    assert wire["error"]["details"][0]["errorType"] == error_type


def test_a_value_in_an_error_message_is_named_by_its_type_or_cut_short() -> None:
    # A list nested 1,000 deep is valid JSON orjson reads; its repr raises RecursionError (once a 500).
    deep: list = []
    for _ in range(999):
        deep = [deep]
    for body in (
        {"comment": {"text": "hi", "type": deep}, "requestedAttributes": {"TOXICITY": {}}},
        {"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {"scoreType": deep}}},
        {"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {}}, "context": {"entries": [{"text": "a", "type": deep}]}},
    ):
        with pytest.raises(ApiError) as err:
            _analyze(body)
        assert err.value.status == 400 and err.value.message.endswith(": an array")
    with pytest.raises(ApiError) as err:
        _analyze({"comment": {"text": "hi", "type": "X" * 100_000}, "requestedAttributes": {"TOXICITY": {}}})
    assert err.value.message == "Unknown text type at 'comment.type': '" + "X" * 40 + "'…"


def test_unsupported_language_error_matches_the_documented_body() -> None:
    with pytest.raises(ApiError) as err:
        _analyze({"comment": {"text": "hola"}, "requestedAttributes": {"TOXICITY": {}}, "languages": ["xx"]})
    wire = err.value.body(perspective=True)
    assert wire["error"]["message"] == "Attribute TOXICITY does not support request languages: xx"
    detail = dict(wire["error"]["details"][0])
    assert detail.pop("@type") == "type.googleapis.com/google.commentanalyzer.v1alpha1.Error"
    expected = docs.ISSUE_LANGUAGE_ERROR["error"]
    assert detail == expected["details"][0]
    assert (wire["error"]["code"], wire["error"]["status"]) == (expected["code"], expected["status"])


def test_languages_default_to_english_and_regional_codes_count() -> None:
    assert _analyze({"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {}}}).languages == ("en",)
    assert _analyze({"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {}}, "languages": ["en-GB"]}).languages == ("en-GB",)
    dropped = _analyze({"comment": {"text": "hi"}, "requestedAttributes": {"TOXICITY": {}}, "languages": ["de"], "dropUnsupportedAttributes": True})
    assert dropped.attributes == () and pv.render_analyze(dropped, None, [])["attributeScores"] == {}


def _analyze_outcome(drawn: tuple[object, dict | None, dict[str, float]]) -> str:
    value, canonical, probabilities = drawn
    try:
        request = _analyze(value)
    except ApiError as exc:
        assert exc.status == 400 and exc.perspective_type in docs.ERROR_TYPES
        return "refused"
    # json_values' keys have at most 12 characters, so never requestedAttributes: only built requests parse.
    assert canonical is not None, value
    text = canonical["comment"]["text"]
    assert request.text == text and text.strip() and len(text.encode("utf-8")) <= 100
    # Every requested attribute is one the model scores, under its threshold as asked; all or none dropped.
    requested = canonical["requestedAttributes"]
    dropped = request.attributes == () and canonical.get("dropUnsupportedAttributes") is True
    assert dropped or [a.name for a in request.attributes] == list(requested)
    for attr in request.attributes:
        assert attr.label == ATTRIBUTES[attr.name]
        threshold = (requested[attr.name] or {}).get("scoreThreshold")
        assert attr.threshold == (None if threshold is None else float(threshold)) and 0.0 <= (attr.threshold or 0.0) <= 1.0
    languages = canonical.get("languages") or []
    assert request.languages == (tuple(languages) if languages else ("en",))
    assert request.client_token == canonical.get("clientToken")
    # Spans: asked for and something to score, then each sentence, in order, inside the text.
    if canonical.get("spanAnnotations") is True and request.attributes:
        assert 1 <= len(request.spans) <= 3 and request.spans == tuple(sentence_spans(text))
    else:
        assert request.spans == ()
    last = 0
    for span in request.spans:
        assert last <= span.start < span.stop <= len(text) and 0 <= span.begin < span.end <= utf16_len(text)
        last = span.stop
    # The answer: an attribute shows exactly when it reached its threshold, its spans where the request's are.
    answer = pv.render_analyze(request, _score(probabilities), [_score(probabilities)] * len(request.span_texts()))
    assert set(answer["attributeScores"]) <= {a.name for a in request.attributes}
    for attr in request.attributes:
        probability = round(probabilities[attr.label], 6)
        shown = answer["attributeScores"].get(attr.name)
        assert (shown is not None) == (attr.threshold is None or probability >= attr.threshold), (attr, probability)
        if shown is not None:
            assert shown["summaryScore"]["value"] == probability
            assert [(s["begin"], s["end"]) for s in shown.get("spanScores", [])] == [(s.begin, s.end) for s in request.spans]
    return "parsed with sentences" if len(request.spans) > 1 else "parsed"


def test_any_json_analyze_parses_or_is_refused_with_a_400() -> None:
    requests = json_values.map(lambda v: (v, None)) | analyze_requests()
    probabilities = st.fixed_dictionaries({label: st.floats(0, 1) for label in JIGSAW})
    seen = _outcomes(st.tuples(requests, probabilities).map(lambda d: (*d[0], d[1])), _analyze_outcome)
    _reached_both(seen)
    assert seen["parsed with sentences"] >= seen.total() // 20, f"spans are barely reached: {dict(seen)}"


# ---------------------------------------------------------------------------------------------
# Perspective: suggestscore


def test_documented_suggest_example() -> None:
    suggestion = pv.parse_suggest(docs.SUGGEST_REQUEST, attributes=pv.attribute_map(list(JIGSAW)), max_text_bytes=200)
    assert suggestion.labels == {"toxic": 0.0} and suggestion.community_id == "/forum/movies"
    assert pv.render_suggest(suggestion) == docs.SUGGEST_RESPONSE
    record = suggestion.record(api_key_name="k")
    assert record["text"] == docs.SUGGEST_REQUEST["comment"]["text"] and record["schema_version"] == "1"


@pytest.mark.parametrize(
    "scores, fragment",
    [
        ({}, "must not be empty"),
        ({"TOXICITY": {}}, "must not be empty"),
        ({"TOXICITY": {"summaryScore": {"value": 1.5}}}, "between 0 and 1"),
        ({"TOXICITY": {"summaryScore": {}}}, "value' is missing"),
        ({"TOXICITY": {"spanScores": [{"begin": 3, "end": 2, "score": {"value": 1}}]}}, "begin < end"),
        ({"TOXICITY": {"spanScores": [{"begin": 0, "end": 99, "score": {"value": 1}}]}}, "begin < end"),
        ({"TOXICITY": {"spanScores": [{"end": 2, "score": {"value": 1}}]}}, "must be set"),
    ],
)
def test_suggest_errors(scores: dict, fragment: str) -> None:
    with pytest.raises(ApiError) as err:
        pv.parse_suggest({"comment": {"text": "hello"}, "attributeScores": scores}, attributes={"TOXICITY": "toxic"}, max_text_bytes=200)
    assert err.value.status == 400 and fragment in err.value.message


def test_suggested_spans_use_utf16_offsets_and_unknown_attributes_keep_their_name() -> None:
    text = "😀 nice"  # 7 UTF-16 units: the emoji takes two
    ok = pv.parse_suggest(
        {"comment": {"text": text}, "attributeScores": {"SPAM": {"spanScores": [{"begin": 0, "end": 7, "score": {"value": 1}}]}}},
        attributes={"TOXICITY": "toxic"}, max_text_bytes=200,
    )
    assert ok.spans == {"spam": [{"begin": 0, "end": 7, "value": 1.0}]}


# ---------------------------------------------------------------------------------------------
# Sentence spans


def test_spans_split_sentences_and_lines_in_utf16() -> None:
    text = 'He said "stop." Then 😀 left!  \n\nNext line'
    spans = sentence_spans(text)
    assert [text[s.start : s.stop] for s in spans] == ['He said "stop."', "Then 😀 left!", "Next line"]
    assert [(s.begin, s.end) for s in spans] == [(0, 15), (16, 29), (33, 42)]
    assert sentence_spans(" \n ") == []


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(max_size=80))
def test_spans_are_ordered_trimmed_and_their_utf16_offsets_slice_the_same_text(text: str) -> None:
    units = text.encode("utf-16-le", "surrogatepass")
    last = -1
    for span in sentence_spans(text):
        piece = text[span.start : span.stop]
        assert piece and piece == piece.strip() and span.start > last
        assert units[2 * span.begin : 2 * span.end].decode("utf-16-le", "surrogatepass") == piece
        assert span.end <= utf16_len(text)
        last = span.stop
    if text.strip():
        assert sentence_spans(text)
