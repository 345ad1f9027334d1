# Included from tests/CMakeLists.txt. Checks systemd/: `systemd-analyze verify` of
# the unit against the built medgated, sysusers.d and tmpfiles.d files applied to
# a temporary root, and the unit's `systemd-analyze security` exposure against the
# threshold recorded in systemd_test.sh. Exit 77 (no systemd tools, no /proc) = skipped.
add_test(NAME "integration: systemd units"
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/systemd_test.sh $<TARGET_FILE:medgated>)
set_tests_properties("integration: systemd units" PROPERTIES
                     SKIP_RETURN_CODE 77
                     TIMEOUT 120
                     LABELS "integration;systemd")
