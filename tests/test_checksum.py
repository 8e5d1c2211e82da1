"""The per-bucket checksum: any odd length, a changed or moved word is caught."""

from __future__ import annotations

import pytest
import torch

from shardsync.runtime.wire import checksum


@pytest.mark.parametrize("dtype, numel", [(torch.bfloat16, 3_000_001), (torch.bfloat16, 5), (torch.float32, 4097),
                                          (torch.float16, (1 << 21) + 3)])
def test_a_bucket_checks_clean_and_any_change_is_caught(dtype, numel):
    generator = torch.Generator().manual_seed(numel)
    buffer = torch.zeros(numel + checksum.tail_elements(dtype), dtype=dtype)
    buffer[:numel] = torch.randn(numel, generator=generator).to(dtype)
    sent = checksum.write(buffer, numel)
    assert sent.numel() == numel + checksum.tail_elements(dtype)
    assert checksum.check(buffer, numel) is None

    swapped = buffer.clone()  # two words trade places: the plain sum stays, the weighted one not
    swapped[[1, numel - 2]] = swapped[[numel - 2, 1]]
    if not torch.equal(swapped, buffer):
        assert checksum.check(swapped, numel) is not None
    flipped = buffer.clone()
    flipped[:numel].view(torch.uint8)[numel // 2] ^= 0x01
    assert checksum.check(flipped, numel) is not None


def test_the_sums_are_their_definition_across_chunks():
    """Summed a chunk at a time, the weighted sum is still every word times its index
    plus one, modulo 2**32, past several chunks and in a partial last one."""
    words = torch.randint(-2**31, 2**31, (2 * checksum.CHUNK + 12345,), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(3))
    wide = words.to(torch.int64)
    expected = [int(wide.sum()) % 2**32, int((wide * torch.arange(1, len(words) + 1)).sum()) % 2**32]
    assert checksum.compute(words).tolist() == expected
