"""Type chat: OpenAI ``messages`` (or ShareGPT through column_map and roles) rendered by a chat template.

The trained text of a turn is what the template adds for it from the content on: the content and the template's
end-of-turn marker (``<|im_end|>`` for ChatML), without the whitespace that follows. Found by
rendering prefixes of the conversation, so any template works that renders a conversation as the
concatenation of its turns (the property generation relies on too); one that doesn't is refused.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from spra_dist.data.codec import Codec
from spra_dist.data.config import ROLES
from spra_dist.data.formats import Prep, _collect, bad_row, finish, mark

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant",
                "system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def resolve_template(setting: str | None, codec: Codec) -> str:
    """The template text for data.chat_template: None (the tokenizer's), chatml, or a Jinja file."""
    if setting is None:
        if not codec.chat_template:
            raise ValueError("type chat needs a chat template and this tokenizer has none; set "
                             "data.chat_template=chatml or data.chat_template=<file.jinja>")
        return codec.chat_template
    if setting == "chatml":
        return CHATML
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ValueError(f"data.chat_template={setting!r} is neither chatml nor an existing Jinja file; give "
                         "chatml, a path to a .jinja file, or leave it unset for the tokenizer's template")
    return path.read_text(encoding="utf-8")


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as err:
        raise ValueError(f"data.chat_template does not compile as Jinja ({err}); fix the template") from None


def render(template: str, messages: list[dict], *, codec: Codec, add_generation_prompt: bool = False) -> str:
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                      bos_token=codec.bos_token, eos_token=codec.eos_token)


def end_of_turn(template: str, codec: Codec) -> str:
    """The text the template puts after an assistant message's content (its end-of-turn marker)."""
    talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\u2603"}]
    text = render(template, talk, codec=codec)
    return text[text.rindex("\u2603") + 1:].strip()


def build_chat(batch: dict, prep: Prep) -> dict[str, list]:
    items = [trained_ranges(prep, row, normalise(prep, row, messages))
             for row, messages in zip(batch["__row__"], batch["messages"], strict=True)]
    marked = mark(prep.codec, items, special=False, eos=False)
    return _collect(finish(prep, row, ids, labels) for row, (ids, labels) in zip(batch["__row__"], marked,
                                                                                 strict=True))


def normalise(prep: Prep, row: int, messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_row(prep, row, f"messages is {type(messages).__name__} {messages!r:.60}",
                      "give a non-empty list of {role, content} objects")
    talk = []
    for j, message in enumerate(messages):
        nth = f"message {j + 1} of {len(messages)}"
        if not isinstance(message, dict) or prep.role_key not in message or prep.content_key not in message:
            keys = ", ".join(message) if isinstance(message, dict) else type(message).__name__
            raise bad_row(prep, row, f"{nth} has no {prep.role_key!r}/{prep.content_key!r} (it has {keys})",
                          "map the keys with column_map: {role: <key>, content: <key>}")
        name, content = message[prep.role_key], message[prep.content_key]
        role = prep.roles.get(name)
        if role is None:
            raise bad_row(prep, row, f"{nth} has unknown role {name!r}",
                          f"map it to one of {', '.join(ROLES)}, e.g. roles: {{assistant: [{name}]}}")
        if not isinstance(content, str):
            raise bad_row(prep, row, f"{nth} content is {type(content).__name__}, not a string",
                          "give every message's content as a string")
        talk.append({"role": role, "content": content})
    return talk


def trained_ranges(prep: Prep, row: int, talk: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    codec, template = prep.codec, prep.template
    text = render(template, talk, codec=codec)
    trained = []
    for i, message in enumerate(talk):
        if message["role"] not in prep.roles_to_train or not message["content"]:
            continue
        before = render(template, talk[:i], codec=codec)
        upto = render(template, talk[: i + 1], codec=codec)
        at = upto.find(message["content"], len(before))
        if at < 0 and message["role"] == "assistant":  # the template rewrites the content: start after the header
            head = render(template, talk[:i], codec=codec, add_generation_prompt=True)
            at = len(head) if upto.startswith(head) else -1
        if not (text.startswith(upto) and upto.startswith(before)) or at < 0:
            raise bad_row(prep, row, f"the chat template does not render turn {i + 1} of {len(talk)} as a prefix "
                          "of the conversation, so its trained tokens cannot be found",
                          "use data.chat_template=chatml or a template that renders turn by turn")
        end = len(upto.rstrip())
        if end > at:
            trained.append((at, end))
    return text, trained


def role_map(entry_roles: dict[str, list[str]]) -> dict[str, str]:
    """Data role name -> ours: the usual aliases, plus the entry's roles setting."""
    out = dict(ROLE_ALIASES)
    for ours, names in entry_roles.items():
        out.update({name: ours for name in names})
    return out
