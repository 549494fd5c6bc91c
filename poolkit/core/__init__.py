"""The base every layer stands on: URLs (redacted), settings, pooler detection, driver errors translated."""
