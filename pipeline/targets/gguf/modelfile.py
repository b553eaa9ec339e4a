"""Ollama ``Modelfile`` next to each GGUF: FROM, TEMPLATE, SYSTEM, PARAMETER stop.

Ollama templates are Go templates; HF chat templates are Jinja. There is no
general translator, so this one *measures* the Jinja template instead of parsing
it: it renders probe conversations with sentinel contents and reads off each
role's prefix and suffix, the text before the first message, and the generation
prompt. That covers the common "per-message prefix + content + suffix" family
(ChatML / Qwen, Llama 3, Zephyr/TinyLlama-style ``<|role|>`` markers, the demo
model's template, ...). The translated template is then checked: it is
evaluated (with the same semantics as the Go template written) on conversations
that differ from the probes and must reproduce the Jinja rendering exactly;
if not (tool calls, role alternation rules, content rewriting), no TEMPLATE is
written and the reason is recorded. A default system prompt that the template
inserts when a conversation has none becomes the Modelfile's ``SYSTEM``: Ollama
puts it first as a system message in the same case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
_S = {"system": "\x01SYS{}\x01", "user": "\x01USR{}\x01", "assistant": "\x01AST{}\x01"}


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as per-role prefix/suffix, the head and the generation prompt."""

    head: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    #: the system prompt the template inserts when a conversation has none (the Modelfile's SYSTEM)
    system_default: str | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """What Ollama renders for these messages with the Go template below and the Modelfile's SYSTEM
        (Ollama puts SYSTEM first as a system message when the conversation does not start with one)."""
        if self.system_default is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_default}, *messages]
        out = [self.head]
        for m in messages:
            if m["role"] in self.prefix:
                out += [self.prefix[m["role"]], m["content"], self.suffix[m["role"]]]
        if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
            out.append(self.generation)
        return "".join(out)

    def go_template(self) -> str:
        # No {{- trim markers: they would also eat newlines that belong to the literals.
        branches = []
        for role in ROLES:
            if role in self.prefix:
                kw = "if" if not branches else "else if"
                branches.append(f'{{{{ {kw} eq .Role "{role}" }}}}{self.prefix[role]}{{{{ .Content }}}}{self.suffix[role]}')
        return (
            self.head
            + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            + "".join(branches)
            + "{{ end }}"
            + f'{{{{ if and $last (ne .Role "assistant") }}}}{self.generation}{{{{ end }}}}'
            + "{{ end }}"
        )


@dataclass
class OllamaSpec:
    """What the Modelfile says beyond FROM; JSON-able for the convert stage's manifest."""

    template: str | None = None
    stops: list[str] = field(default_factory=list)
    note: str = ""
    system: str | None = None  # the chat template's default system prompt

    def to_dict(self) -> dict:
        return {"template": self.template, "stops": self.stops, "note": self.note, "system": self.system}


def ollama_spec(model_dir: Path, tok=None) -> OllamaSpec:
    """Read the HF tokenizer's chat template and special tokens into an OllamaSpec."""
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
    eos = tok.eos_token if isinstance(tok.eos_token, str) else None
    stops = [eos] if eos else []
    if not getattr(tok, "chat_template", None):
        return OllamaSpec(None, stops, "the tokenizer has no chat template: no TEMPLATE written (raw completion)")
    try:
        fmt = measure(lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen), tok.bos_token)
    except TemplateNotSupported as exc:
        return OllamaSpec(None, stops, f"chat template not translated: {exc}")
    for s in (fmt.suffix.get("assistant", "").strip(), fmt.prefix.get("user", "").strip()):
        if s and s not in stops and "{{" not in s:
            stops.append(s)
    note = "TEMPLATE translated from the tokenizer's chat template (checked on test conversations)"
    if fmt.system_default is not None:
        note += "; SYSTEM is the default system prompt the template inserts"
    return OllamaSpec(fmt.go_template(), stops, note, fmt.system_default)


class TemplateNotSupported(Exception):
    pass


def measure(render, bos: str | None) -> ChatFormat:
    """Probe a Jinja chat template through `render(messages, add_generation_prompt)`."""
    roles = list(ROLES)
    try:
        render(_conv(["system", "user"]), True)
    except Exception:  # templates that refuse a system role (raise_exception) keep user/assistant only
        roles.remove("system")
    try:
        try:
            fmt = _measure(render, roles, bos)
        except TemplateNotSupported:
            if "system" not in roles:
                raise
            # Templates that insert a default system prompt when the conversation has none (SmolLM2's):
            # that text is read as the Modelfile's SYSTEM.
            fmt = _measure_default_system(render, bos)
    except TemplateNotSupported:
        raise
    except Exception as exc:  # a template that fails on the probe conversations
        raise TemplateNotSupported(f"rendering the probes failed ({type(exc).__name__}: {exc})") from None
    _check(render, fmt, roles)
    for text in (fmt.head, fmt.generation, fmt.system_default or "", *fmt.prefix.values(), *fmt.suffix.values()):
        if "{{" in text or '"""' in text:
            raise TemplateNotSupported("literal text contains '{{' or '\"\"\"', which a Modelfile TEMPLATE cannot carry")
    return fmt


def _conv(roles: list[str], n: int = 0) -> list[dict]:
    return [{"role": r, "content": _S[r].format(i + n)} for i, r in enumerate(roles)]


def _between(text: str, a: str | None, b: str | None) -> str:
    start = text.index(a) + len(a) if a else 0
    end = text.index(b, start) if b else len(text)
    return text[start:end]


def _strip(text: str, prefix: str = "", suffix: str = "") -> str:
    if not text.startswith(prefix) or not text.endswith(suffix) or len(prefix) + len(suffix) > len(text):
        raise TemplateNotSupported("role markers are not a fixed prefix/suffix around each message")
    return text[len(prefix): len(text) - len(suffix) if suffix else None]


def _measure(render, roles: list[str], bos: str | None) -> ChatFormat:
    ua = _conv(["user", "assistant"])
    u_a, a_a = ua[0]["content"], ua[1]["content"]
    plain = render(ua, False)
    x_asst = _between(plain, a_a, None)
    uau = _conv(["user", "assistant", "user"])
    full = render(uau, False)
    x_user = _between(full, uau[2]["content"], None)
    p_user = _strip(_between(full, uau[1]["content"], uau[2]["content"]), prefix=x_asst)
    p_asst = _strip(_between(plain, u_a, a_a), prefix=x_user)
    head = _strip(_between(plain, None, u_a), suffix=p_user)
    generation = _strip(render(uau, True), prefix=full)
    prefix = {"user": p_user, "assistant": p_asst}
    suffix = {"user": x_user, "assistant": x_asst}
    if "system" in roles:
        su = _conv(["system", "user"])
        text = render(su, False)
        prefix["system"] = _strip(_between(text, None, su[0]["content"]), prefix=head)
        suffix["system"] = _strip(_between(text, su[0]["content"], su[1]["content"]), suffix=p_user)
    if bos and head.startswith(bos):
        # llama.cpp and Ollama add BOS themselves (tokenizer.ggml.add_bos_token); keeping it doubles it.
        head = head[len(bos):]
        rendered_bos = bos
    else:
        rendered_bos = ""
    return _WithBos(head, prefix, suffix, generation, bos=rendered_bos)


def _measure_default_system(render, bos: str | None) -> ChatFormat:
    """Measure with a system message always present, then read the default one off a conversation without it."""
    system = _S["system"].format(99)
    with_system = lambda msgs, gen: render([{"role": "system", "content": system}, *msgs], gen)  # noqa: E731
    fmt = _measure(with_system, ["user", "assistant"], bos)
    if system not in fmt.head:
        raise TemplateNotSupported("the system message is not rendered before the conversation")
    sys_prefix, sys_suffix = fmt.head.split(system, 1)
    user = _conv(["user"], 98)
    bare = render(user, False)
    bare = bare[len(fmt.bos):] if isinstance(fmt, _WithBos) and fmt.bos and bare.startswith(fmt.bos) else bare
    default = _strip(bare, prefix=sys_prefix, suffix=sys_suffix + fmt.prefix["user"] + user[0]["content"] + fmt.suffix["user"])
    return _WithBos("", {"system": sys_prefix, **fmt.prefix}, {"system": sys_suffix, **fmt.suffix}, fmt.generation,
                    default, bos=getattr(fmt, "bos", ""))


@dataclass(frozen=True)
class _WithBos(ChatFormat):
    bos: str = ""

    def render(self, messages, add_generation_prompt):  # the Jinja output includes BOS; the Go one doesn't
        return self.bos + super().render(messages, add_generation_prompt)


def _check(render, fmt: ChatFormat, roles: list[str]) -> None:
    """The measured format must reproduce the Jinja template on conversations it was not measured on."""
    tests = [
        (_conv(["user"], 10), True),
        (_conv(["user", "assistant", "user", "assistant", "user"], 20), True),
        (_conv(["user", "assistant"], 30), False),
    ]
    if "system" in roles:
        tests.append((_conv(["system", "user", "assistant", "user"], 40), True))
    for messages, gen in tests:
        want = render(messages, gen)
        got = fmt.render(messages, gen)
        if want != got:
            seq = "/".join(m["role"] for m in messages)
            raise TemplateNotSupported(f"the per-role prefix/suffix pattern does not reproduce the template for {seq} (it has logic beyond that pattern)")


def modelfile_text(gguf_name: str, spec: OllamaSpec) -> str:
    """The Modelfile for one GGUF in the same folder."""
    from pipeline.targets.cards import ollama_model

    lines = [f"# Ollama: ollama create {ollama_model(gguf_name)} -f Modelfile ({spec.note})", f"FROM ./{gguf_name}"]
    if spec.template is not None:
        lines.append(f'TEMPLATE """{spec.template}"""')
    if spec.system is not None:
        lines.append(f'SYSTEM """{spec.system}"""')
    for stop in spec.stops:
        lines.append(f"PARAMETER stop {_quote(stop)}")
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
