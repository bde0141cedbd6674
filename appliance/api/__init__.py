"""The HTTP API of a serving appliance, its access files and its client."""
