"""What the Registry tab does, without the UI: search, render a card, pull."""

from __future__ import annotations

import json

from quiver.errors import InvalidInputError
from quiver.registry import Expert, ExpertCard, Library, Registry, read_card

SEARCH_COLUMNS = ["repo", "kind", "base model", "tasks", "tags", "updated"]
FILE_COLUMNS = ["file", "size"]
_CARD_FILES = ["README.md", "adapter_config.json", "library.json"]


def search_rows(
    registry: Registry,
    *,
    base_model: str = "",
    task: str = "",
    tag: str = "",
    query: str = "",
    kind: str = "",
    limit: int = 200,
) -> list[list[str]]:
    """One row per matching repo, newest first (``SEARCH_COLUMNS``)."""
    hits = registry.search(
        base_model=base_model.strip() or None,
        task=task.strip() or None,
        tag=tag.strip() or None,
        query=query.strip() or None,
        kind=kind or None,
        limit=limit,
    )
    return [
        [
            hit.repo_id,
            hit.kind,
            hit.base_model or "",
            ", ".join(hit.tasks),
            ", ".join(t for t in hit.tags if not t.startswith(("task:", "base_model:"))),
            hit.last_modified.strftime("%Y-%m-%d %H:%M") if hit.last_modified else "",
        ]
        for hit in hits
    ]


def _require_repo_id(repo_id: str) -> str:
    if not repo_id.strip():
        raise InvalidInputError("no repo chosen", hint="search, then pick a row or type a repo id")
    return repo_id.strip()


def card_markdown(registry: Registry, repo_id: str) -> str:
    """A repo's card rendered: an expert's tasks, training, metrics; a library's experts."""
    repo_id = _require_repo_id(repo_id)
    folder, commit = registry.download(repo_id, patterns=_CARD_FILES)
    if (folder / "library.json").is_file():
        return library_markdown(Library.open(registry, repo_id, revision=commit))
    if not (folder / "adapter_config.json").is_file():
        readme = folder / "README.md"
        text = readme.read_text("utf-8", errors="replace") if readme.is_file() else ""
        return f"### {repo_id} @ `{commit[:10]}`\n\nNot an expert or a library.\n\n{text}"
    card = read_card(folder, label=f"{repo_id}@{commit[:10]}")
    return expert_markdown(repo_id, commit, card)


def expert_markdown(repo_id: str, commit: str, card: ExpertCard) -> str:
    training = [
        f"{card.examples} examples" if card.examples else "",
        f"{card.steps} steps" if card.steps else "",
    ]
    lines = [
        f"### {repo_id} @ `{commit[:10]}`",
        f"LoRA expert for `{card.base_model}`: rank {card.rank}, alpha {card.alpha:g}, "
        f"targets {', '.join(card.target_modules)}",
        "",
        f"- **Tasks**: {', '.join(card.tasks) or 'not given'}",
        f"- **Training**: {', '.join(t for t in training if t) or 'not given'}",
        f"- **Datasets**: {', '.join(card.datasets) or 'not given'}",
        f"- **License**: {card.license or 'not given'}",
        f"- **Tags**: {', '.join(card.tags) or 'none'}",
        f"- **Library**: {card.library or 'none'}",
        f"- **Weights sha256**: `{card.hashes.get('adapter_model.safetensors', 'not pinned')}`",
    ]
    if card.eval_results:
        lines += ["", "| task | dataset | metric | value |", "|---|---|---|---|"]
        lines += [
            f"| {r.task_type} | {r.dataset_name} | {r.metric_name or r.metric_type} | "
            f"{r.metric_value} |"
            for r in card.eval_results
        ]
    else:
        lines += ["- **Metrics**: none reported"]
    if card.description:
        lines += ["", card.description]
    return "\n".join(lines)


def library_markdown(library: Library) -> str:
    manifest = library.manifest
    artifacts = ", ".join(manifest.artifacts) or "none"
    lines = [
        f"### {library.repo_id} @ `{library.commit[:10]}`",
        f"Library of {len(library.names)} experts for `{manifest.base_model}`"
        + (f" (rank {manifest.rank})" if manifest.rank else ""),
        "",
        f"- **Experts**: {', '.join(library.names) or 'none yet'}",
        f"- **Artifacts**: {artifacts}",
    ]
    for strategy, options in (manifest.routing or {}).items():  # the author's advice
        given = ", ".join(f"{key} `{json.dumps(value)}`" for key, value in options.items())
        lines.append(f"- **Routing advice, {strategy}**: {given or 'no options'}")
    if manifest.description:
        lines += ["", manifest.description]
    return "\n".join(lines)


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def pull_expert(registry: Registry, repo_id: str) -> tuple[Expert, str, list[list[str]]]:
    """Pull and verify an expert; return it, its card rendered with its size, and its files."""
    expert = registry.pull(_require_repo_id(repo_id))
    files = sorted(p for p in expert.path.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    text = expert_markdown(expert.repo_id, expert.commit, expert.card)
    text += f"\n\nPulled and verified: {len(files)} files, {_size(total)}, in `{expert.path}`"
    return expert, text, [[p.name, _size(p.stat().st_size)] for p in files]
