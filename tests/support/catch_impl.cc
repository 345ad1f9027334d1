// Catch2's implementation, without a main: medgate_test_support carries it so that binaries with
// a main of their own (the benchmarks) can use the fixtures, whose helpers REQUIRE. Test binaries
// get their main from medgate_catch_main (catch_main.cc), which calls run_catch_session().
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

namespace medgate::testing {

// Catch2 declares Session only where its implementation is compiled, i.e. here.
int run_catch_session(int argc, char* argv[]) {
  return Catch::Session().run(argc, argv);
}

}  // namespace medgate::testing
