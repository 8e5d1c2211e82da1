"""Transfer methods: how an endpoint's share of an update reaches the engines."""
