"""Perspective API compatibility: `comments:analyze` and `comments:suggestscore` (v1alpha1).

Code written for Google's Perspective API works against ESP by changing only its base URL. The
field names, nesting, defaults and error types follow Perspective's public API reference
(conversationai/perspectiveapi, "Methods" and "Limits and errors") and its discovery document:

- ESP's labels appear under Perspective's attribute names where one exists (TOXICITY <- toxic,
  SEVERE_TOXICITY <- severe_toxic, PROFANITY <- obscene, THREAT, INSULT, IDENTITY_ATTACK <-
  identity_hate); any other label under its own name in upper case. The mapping is built from the
  labels the served model declares, never from a fixed list.
- An attribute scoring below its `scoreThreshold` is left out. `languages` and `clientToken` are
  echoed. No `languages` means the first of ESP_API_LANGUAGES (English). ESP detects no language:
  `detectedLanguages` reports the languages the model was told to assume.
- `spanAnnotations`: each sentence is scored as its own text, in the same batch as the comment;
  offsets are UTF-16 code units, `end` exclusive, as Perspective's SpanScore defines them.
- `context`, `sessionId` and `communityId` are accepted (shape-checked) and ignored; `doNotStore`
  is accepted and changes nothing, because `analyze` never stores a comment.
- Field names are accepted in lowerCamelCase or snake_case, as Google's JSON parser accepts both;
  unknown fields are refused, as Google's parser refuses them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from api.errors import ApiError, Perspective, Reason, bad_request
from api.native import json_type, utf8_size
from api.spans import Span, sentence_spans, utf16_len
from esp.contracts import Score, rfc3339, utc_now

# ESP's default (Jigsaw) labels under Perspective's attribute names.
PERSPECTIVE_NAMES = {
    "toxic": "TOXICITY",
    "severe_toxic": "SEVERE_TOXICITY",
    "obscene": "PROFANITY",
    "threat": "THREAT",
    "insult": "INSULT",
    "identity_hate": "IDENTITY_ATTACK",
}
PROBABILITY = "PROBABILITY"
_SCORE_TYPES_UNSUPPORTED = ("STD_DEV_SCORE", "PERCENTILE", "RAW")
_TEXT_TYPES = (None, "PLAIN_TEXT", "TEXT_TYPE_UNSPECIFIED")

ANALYZE_FIELDS = (
    "comment", "context", "requestedAttributes", "spanAnnotations", "languages", "doNotStore",
    "clientToken", "sessionId", "communityId", "dropUnsupportedAttributes",
)
SUGGEST_FIELDS = ("comment", "context", "attributeScores", "languages", "communityId", "clientToken", "sessionId")


def attribute_map(labels: Sequence[str]) -> dict[str, str]:
    """Perspective attribute name -> ESP label, for the labels the model declares.

    A label whose own upper-case name is taken by a Perspective alias keeps its own name (the
    alias goes to nobody), so the mapping is always one to one. So does a label whose upper-case
    name another label shares: `spam` and `Spam` (which prepare-data refuses, but a model exported
    elsewhere may declare) are offered as `spam` and `Spam`, never one of them as `SPAM`, which
    would report one label's score under a name that stands for both and hide the other.
    """
    uppers = [label.upper() for label in labels]
    own = {(upper if uppers.count(upper) == 1 else label): label for label, upper in zip(labels, uppers)}
    out = dict(own)
    for name, label in own.items():
        alias = PERSPECTIVE_NAMES.get(label)
        if alias and alias not in own:
            out[alias] = label
            del out[name]
    return out


def attribute_of(label: str, attributes: Mapping[str, str]) -> str:
    for name, candidate in attributes.items():
        if candidate == label:
            return name
    return label.upper()


# ---------------------------------------------------------------------------------------------
# Shared request pieces


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _fields(obj: Any, allowed: Sequence[str], what: str) -> dict[str, Any]:
    """The object's fields under their lowerCamelCase names; refuses non-objects, unknown and doubled names."""
    if not isinstance(obj, dict):
        raise bad_request(Reason.INVALID_REQUEST, f"Invalid JSON payload received. {what} must be an object.")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = _camel(key) if "_" in key else key
        if name not in allowed:
            raise bad_request(Reason.INVALID_REQUEST, f'Invalid JSON payload received. Unknown name "{key}" at \'{what}\': Cannot find field.')
        if name in out:
            raise bad_request(Reason.INVALID_REQUEST, f"Invalid JSON payload received. {what}.{name} is given twice.")
        out[name] = value
    return out


def _string(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(Reason.INVALID_REQUEST, f"Invalid value at '{what}': expected a string.")
    if utf8_size(value) is None:
        raise bad_request(Reason.INVALID_REQUEST, f"Invalid value at '{what}': not valid Unicode (an unpaired surrogate).")
    return value


def _shown(value: Any) -> str:
    """A client's value in an error message: a string quoted and cut short, anything else by its JSON type."""
    if isinstance(value, str):
        return repr(value[:40]) + ("…" if len(value) > 40 else "")
    return json_type(value)


def _bool(value: Any, what: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(Reason.INVALID_REQUEST, f"Invalid value at '{what}': expected true or false.")
    return value


def _text_entry(obj: Any, what: str) -> str | None:
    entry = _fields(obj, ("text", "type"), what)
    kind = entry.get("type")
    if kind not in _TEXT_TYPES:
        if kind == "HTML":
            raise bad_request(Reason.INVALID_REQUEST, "Currently, only 'PLAIN_TEXT' comments are supported")
        raise bad_request(Reason.INVALID_REQUEST, f"Unknown text type at '{what}.type': {_shown(kind)}")
    return _string(entry.get("text"), f"{what}.text")


def _comment_text(fields: dict[str, Any], max_text_bytes: int) -> str:
    if fields.get("comment") is None:
        raise bad_request(Reason.INVALID_REQUEST, "Comment must be non-empty.", perspective_type=Perspective.COMMENT_EMPTY)
    text = _text_entry(fields["comment"], "comment")
    if text is None or not text.strip():
        raise bad_request(Reason.INVALID_REQUEST, "Comment must be non-empty.", perspective_type=Perspective.COMMENT_EMPTY)
    size = utf8_size(text) or 0
    if size > max_text_bytes:
        raise bad_request(
            Reason.TEXT_TOO_LONG,
            f"Comment text too long: {size} bytes of UTF-8, the limit is {max_text_bytes}.",
            perspective_type=Perspective.COMMENT_TOO_LONG,
        )
    return text


def _check_context(value: Any) -> None:
    if value is None:
        return
    context = _fields(value, ("entries", "articleAndParentComment"), "context")
    entries = context.get("entries")
    if entries is not None:
        if not isinstance(entries, list):
            raise bad_request(Reason.INVALID_REQUEST, "Invalid value at 'context.entries': expected an array.")
        for i, entry in enumerate(entries):
            _text_entry(entry, f"context.entries[{i}]")
    parent = context.get("articleAndParentComment")
    if parent is not None:
        if entries:
            raise bad_request(
                Reason.INVALID_REQUEST,
                "Context can have either entries or article_and_parent_comment, but both fields were populated.",
            )
        pieces = _fields(parent, ("article", "parentComment"), "context.articleAndParentComment")
        for name, entry in pieces.items():
            if entry is not None:
                _text_entry(entry, f"context.articleAndParentComment.{name}")


def _languages(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request(Reason.INVALID_REQUEST, "Invalid value at 'languages': expected an array of language codes.")
    out = []
    for i, lang in enumerate(value):
        code = _string(lang, f"languages[{i}]")
        if not code or not code.strip():
            raise bad_request(Reason.INVALID_REQUEST, f"Invalid value at 'languages[{i}]': an empty language code.")
        out.append(code)
    return out


def _primary(code: str) -> str:
    """`en-US`, `en_GB`, `EN` -> `en` (BCP-47's primary subtag)."""
    return code.strip().replace("_", "-").split("-", 1)[0].lower()


def _probability(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise bad_request(Reason.INVALID_REQUEST, f"Invalid value at '{what}': expected a number between 0 and 1.")
    return float(value)


# ---------------------------------------------------------------------------------------------
# comments:analyze


@dataclasses.dataclass(frozen=True)
class RequestedAttribute:
    name: str  # Perspective's name, as requested
    label: str  # ESP's label
    threshold: float | None


@dataclasses.dataclass(frozen=True)
class AnalyzeRequest:
    text: str
    attributes: tuple[RequestedAttribute, ...]
    spans: tuple[Span, ...]  # empty unless spanAnnotations (and then at least one)
    languages: tuple[str, ...]  # effective languages, as echoed
    client_token: str | None

    def span_texts(self) -> list[str]:
        """The texts to score besides the comment itself: the sentences, when there are several."""
        if len(self.spans) < 2:
            return []
        return [self.text[s.start : s.stop] for s in self.spans]


def parse_analyze(
    obj: Any,
    *,
    attributes: Mapping[str, str],
    supported_languages: Sequence[str],
    max_text_bytes: int,
    max_spans: int,
) -> AnalyzeRequest:
    """Validates an AnalyzeCommentRequest in Perspective's order of checks; raises ApiError (400)."""
    fields = _fields(obj, ANALYZE_FIELDS, "AnalyzeCommentRequest")
    text = _comment_text(fields, max_text_bytes)
    _check_context(fields.get("context"))
    for name in ("sessionId", "communityId"):
        _string(fields.get(name), name)
    client_token = _string(fields.get("clientToken"), "clientToken")
    want_spans = _bool(fields.get("spanAnnotations"), "spanAnnotations")
    _bool(fields.get("doNotStore"), "doNotStore")
    drop_unsupported = _bool(fields.get("dropUnsupportedAttributes"), "dropUnsupportedAttributes")

    requested = fields.get("requestedAttributes")
    if requested is None or requested == {}:
        raise bad_request(Reason.INVALID_REQUEST, "Missing requested_attributes", perspective_type=Perspective.NO_REQUESTED_ATTRIBUTES)
    if not isinstance(requested, dict):
        raise bad_request(Reason.INVALID_REQUEST, "Invalid value at 'requestedAttributes': expected an object.")
    chosen = []
    for name, params in requested.items():
        label = attributes.get(name)
        if label is None:
            known = ", ".join(sorted(attributes))
            raise bad_request(Reason.INVALID_REQUEST, f"Unknown requested attribute: {name} (this model scores {known})")
        p = _fields(params if params is not None else {}, ("scoreType", "scoreThreshold"), f"requestedAttributes.{name}")
        score_type = p.get("scoreType")
        if score_type in _SCORE_TYPES_UNSUPPORTED:
            raise bad_request(Reason.INVALID_REQUEST, f"Requested score type {score_type} is not supported by attribute {name}")
        if score_type not in (None, PROBABILITY, "SCORE_TYPE_UNSPECIFIED"):
            raise bad_request(Reason.INVALID_REQUEST, f"Invalid value at 'requestedAttributes.{name}.scoreType': {_shown(score_type)}")
        threshold = p.get("scoreThreshold")
        if threshold is not None:
            threshold = _probability(threshold, f"requestedAttributes.{name}.scoreThreshold")
        chosen.append(RequestedAttribute(name, label, threshold))

    requested_langs = _languages(fields.get("languages"))
    effective = tuple(requested_langs) if requested_langs else (supported_languages[0],)
    unsupported = [lang for lang in requested_langs if _primary(lang) not in supported_languages]
    if unsupported:
        if not drop_unsupported:
            first = chosen[0].name
            raise bad_request(
                Reason.INVALID_REQUEST,
                f"Attribute {first} does not support request languages: {', '.join(requested_langs)}",
                perspective_type=Perspective.LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE,
                perspective_detail={
                    "languageNotSupportedByAttributeError": {
                        "attribute": first,
                        "requestedLanguages": requested_langs,
                        "detectedLanguages": [],
                    }
                },
            )
        chosen = []  # one model, one set of languages: every attribute is dropped alike

    spans: tuple[Span, ...] = ()
    if want_spans and chosen:
        spans = tuple(sentence_spans(text))
        if len(spans) > max_spans:
            raise bad_request(
                Reason.INVALID_REQUEST,
                f"spanAnnotations: the comment has {len(spans)} sentences, at most {max_spans} are scored per request "
                "(send it without spanAnnotations, or split it)",
            )
    return AnalyzeRequest(text, tuple(chosen), spans, effective, client_token)


def render_analyze(request: AnalyzeRequest, summary: Score | None, span_scores: Sequence[Score]) -> dict[str, Any]:
    """The AnalyzeCommentResponse for a scored request (`span_scores` aligned with `request.span_texts()`)."""
    attribute_scores: dict[str, Any] = {}
    for attr in request.attributes:
        assert summary is not None
        value = _value(summary, attr.label)
        if attr.threshold is not None and value < attr.threshold:
            continue
        entry: dict[str, Any] = {}
        if request.spans:
            if span_scores:
                spans = [(s, _value(sc, attr.label)) for s, sc in zip(request.spans, span_scores)]
            else:  # one sentence: its score is the comment's
                spans = [(request.spans[0], value)]
            entry["spanScores"] = [
                {"begin": s.begin, "end": s.end, "score": {"value": v, "type": PROBABILITY}} for s, v in spans
            ]
        entry["summaryScore"] = {"value": value, "type": PROBABILITY}
        attribute_scores[attr.name] = entry
    out: dict[str, Any] = {
        "attributeScores": attribute_scores,
        "languages": list(request.languages),
        "detectedLanguages": list(request.languages),
    }
    if request.client_token is not None:
        out["clientToken"] = request.client_token
    return out


def _value(score: Score, label: str) -> float:
    return round(float(score.probabilities[label]), 6)


# ---------------------------------------------------------------------------------------------
# comments:suggestscore


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """A suggested score: labelled data for the next training run, as published to the feedback topic."""

    text: str
    labels: dict[str, float]  # ESP label (or the attribute's lower-case name) -> suggested summary score
    spans: dict[str, list[dict[str, Any]]]  # label -> [{"begin", "end", "value"}] (UTF-16 offsets)
    languages: list[str]
    community_id: str | None
    session_id: str | None
    client_token: str | None

    def record(self, *, api_key_name: str | None, model_name: str | None = None, model_version: int | None = None) -> dict[str, Any]:
        return {
            "schema_version": "1",
            "text": self.text,
            "labels": self.labels,
            "spans": self.spans,
            "languages": self.languages,
            "community_id": self.community_id,
            "session_id": self.session_id,
            "client_token": self.client_token,
            "api_key_name": api_key_name,
            "model": {"name": model_name, "version": model_version} if model_name else None,
            "suggested_at": rfc3339(utc_now()),
        }


def parse_suggest(obj: Any, *, attributes: Mapping[str, str], max_text_bytes: int) -> Suggestion:
    """Validates a SuggestCommentScoreRequest; raises ApiError (400) with Perspective's error type."""
    fields = _fields(obj, SUGGEST_FIELDS, "SuggestCommentScoreRequest")
    text = _comment_text(fields, max_text_bytes)
    _check_context(fields.get("context"))
    scores = fields.get("attributeScores")
    if not scores:
        raise bad_request(Reason.INVALID_REQUEST, "attribute_scores must not be empty.", perspective_type=Perspective.NO_REQUESTED_ATTRIBUTES)
    if not isinstance(scores, dict):
        raise bad_request(Reason.INVALID_REQUEST, "Invalid value at 'attributeScores': expected an object.")
    length16 = utf16_len(text)
    labels: dict[str, float] = {}
    spans: dict[str, list[dict[str, Any]]] = {}
    for name, value in scores.items():
        what = f"attributeScores.{name}"
        if _string(name, what) is None or not name.strip():
            raise bad_request(Reason.INVALID_REQUEST, "attribute names must not be empty.")
        label = attributes.get(name, name.lower())
        entry = _fields(value, ("summaryScore", "spanScores"), what)
        if entry.get("summaryScore") is None and not entry.get("spanScores"):
            raise bad_request(Reason.INVALID_REQUEST, f"{what} must not be empty: give summaryScore, spanScores or both.")
        if entry.get("summaryScore") is not None:
            labels[label] = _suggested(entry["summaryScore"], f"{what}.summaryScore")
        if entry.get("spanScores") is not None:
            if not isinstance(entry["spanScores"], list):
                raise bad_request(Reason.INVALID_REQUEST, f"Invalid value at '{what}.spanScores': expected an array.")
            spans[label] = [_suggested_span(s, f"{what}.spanScores[{i}]", length16) for i, s in enumerate(entry["spanScores"])]
    return Suggestion(
        text=text,
        labels=labels,
        spans=spans,
        languages=_languages(fields.get("languages")),
        community_id=_string(fields.get("communityId"), "communityId"),
        session_id=_string(fields.get("sessionId"), "sessionId"),
        client_token=_string(fields.get("clientToken"), "clientToken"),
    )


def _suggested(obj: Any, what: str) -> float:
    score = _fields(obj, ("value", "type"), what)
    if score.get("type") not in (None, PROBABILITY, "SCORE_TYPE_UNSPECIFIED"):
        raise bad_request(Reason.INVALID_REQUEST, f"Invalid value at '{what}.type': only PROBABILITY scores can be suggested.")
    if "value" not in score:
        raise bad_request(Reason.INVALID_REQUEST, f"'{what}.value' is missing: every score must be set explicitly.")
    return _probability(score["value"], f"{what}.value")


def _suggested_span(obj: Any, what: str, length16: int) -> dict[str, Any]:
    span = _fields(obj, ("begin", "end", "score"), what)
    begin, end = span.get("begin"), span.get("end")
    for name, v in (("begin", begin), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad_request(Reason.INVALID_REQUEST, f"'{what}.{name}' must be set to an integer.")
    if not 0 <= begin < end <= length16:
        raise bad_request(Reason.INVALID_REQUEST, f"'{what}': need 0 <= begin < end <= {length16} (UTF-16 offsets into the comment).")
    if span.get("score") is None:
        raise bad_request(Reason.INVALID_REQUEST, f"'{what}.score' is missing.")
    return {"begin": begin, "end": end, "value": _suggested(span["score"], f"{what}.score")}


def render_suggest(suggestion: Suggestion) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if suggestion.client_token is not None:
        out["clientToken"] = suggestion.client_token
    if suggestion.languages:
        out["requestedLanguages"] = suggestion.languages
    return out


def check_labels_known(attributes: Mapping[str, str]) -> None:
    if not attributes:
        raise ApiError(503, Reason.MODEL_UNAVAILABLE, "the model's labels are not known yet (the model server has not answered)", retry_after_s=1)
