"""The demos: the RL loop on Ray (`shardsync demo`) and the plain transfer demo."""
