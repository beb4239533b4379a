"""Circuits: clean/corrupted tasks (``tasks``), activation / path / attribution patching
(``patching``) and circuit discovery, faithfulness and overlap (``discovery``)."""
