"""Backends for other PEFT libraries: `peftkern.integrations.peft` for Hugging Face PEFT."""
