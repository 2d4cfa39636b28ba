#!/usr/bin/env python3
"""Parses a JUnit XML file with the standard library's XML parser and checks
its counts add up (testsuites/testsuite 'tests' and 'failures' against the
testcase and failure elements); prints a one-line summary."""
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
assert root.tag == "testsuites", root.tag
cases = root.findall("./testsuite/testcase")
failures = root.findall("./testsuite/testcase/failure")
assert int(root.get("tests")) == len(cases), (root.get("tests"), len(cases))
assert int(root.get("failures")) == len(failures), (root.get("failures"), len(failures))
for suite in root.findall("testsuite"):
    assert int(suite.get("tests")) == len(suite.findall("testcase"))
    assert int(suite.get("failures")) == len(suite.findall("testcase/failure"))
print(f"{len(cases)} testcases, {len(failures)} failures")
