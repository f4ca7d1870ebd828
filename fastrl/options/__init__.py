"""The options of each loss family as frozen dataclasses: declared once, validated in one
place, importable without torch."""
