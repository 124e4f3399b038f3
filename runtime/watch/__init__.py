"""``edgecap watch``: video sources, the scene gate and caption stream, many cameras on one model,
their config file, metrics and Home Assistant discovery."""
