// The main of the Catch test binaries (medgate_catch_main); Catch itself is in catch_impl.cc.
namespace medgate::testing {
int run_catch_session(int argc, char* argv[]);
}

int main(int argc, char* argv[]) {
  return medgate::testing::run_catch_session(argc, argv);
}
