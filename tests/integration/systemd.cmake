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

# The Debian package: cpack builds it, then it is installed, used, removed and purged in a clean
# Debian 12 root (debootstrap + chroot). Fails, never skips, when it cannot run (no root, no
# network to the mirror): ./setup gives a machine everything it needs. The first run makes the
# base root (a few minutes, kept in /var/tmp/medgate-pkg-test); later runs take about one.
add_test(NAME "package: install in a clean Debian 12 root"
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/package_test.sh ${CMAKE_BINARY_DIR})
set_tests_properties("package: install in a clean Debian 12 root" PROPERTIES
                     TIMEOUT 900
                     LABELS "integration;package")
