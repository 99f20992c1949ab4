"""The dashboard test's browser harness starts Chromium whatever numbers its pipes get."""
import os

import pytest

from testkit.chromium_cdp import Chromium, find_chromium


@pytest.mark.parametrize('lowest', [3, 99, 100, 101])
def test_chromium_starts_with_its_pipes_at_any_number(tmp_path, lowest):
    """Late in a CI run the test process has over a hundred descriptors open: the pipes to
    the browser got the numbers the harness used as spares (100, 101) and the browser never
    answered (failed before at 100 and 101)."""
    binary = find_chromium()
    if not binary:
        pytest.skip('chromium not found (Debian: apt-get install chromium)')
    held = []
    try:
        while True:         # take the lowest numbers: the pipes land at ``lowest`` and up
            fd = os.open(os.devnull, os.O_RDONLY)
            if fd >= lowest:
                os.close(fd)
                break
            held.append(fd)
        browser = Chromium(binary, str(tmp_path / 'profile'), height=600)
        try:
            assert browser.evaluate('6 * 7') == 42
        finally:
            browser.close()
    finally:
        for fd in held:
            os.close(fd)
