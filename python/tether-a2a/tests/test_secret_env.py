"""TETHER_ENV_FILE: loaded into the environment; a bad line named by number, never shown."""

from __future__ import annotations

import os
import tempfile
import unittest

from tether_a2a.secret_env import SecretEnvError, load


class SecretEnvTest(unittest.TestCase):
    def test_loads_into_the_environment(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "env")
            with open(p, "w", encoding="utf-8") as f:
                f.write("# c\n\nAPI_KEY=s3cr=et\nOTHER=2\n")
            env = {"TETHER_ENV_FILE": p}
            self.assertEqual(load(env, wait=0), ["API_KEY", "OTHER"])
            self.assertEqual(env["API_KEY"], "s3cr=et")

    def test_bad_line_and_missing_file(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "env")
            with open(p, "w", encoding="utf-8") as f:
                f.write("A=1\nhunter2\n")
            with self.assertRaises(SecretEnvError) as e:
                load({"TETHER_ENV_FILE": p}, wait=0)
            self.assertIn("line 2", str(e.exception))
            self.assertNotIn("hunter2", str(e.exception))
            with self.assertRaises(SecretEnvError):
                load({"TETHER_ENV_FILE": os.path.join(d, "none")}, wait=0)
        self.assertEqual(load({}, wait=0), [])


if __name__ == "__main__":
    unittest.main()
