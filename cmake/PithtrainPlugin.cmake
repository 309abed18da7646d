# pithtrain_add_plugin(): builds the plugin in the calling folder plugins/<kind>/<name>/ as
# <build>/plugins/<kind>_<name>.so from plugin.cpp + <name>.cpp, and its test test_<name>.cpp (if
# present) linking the same objects statically. Everything is derived from the folder name.
function(pithtrain_add_plugin)
  get_filename_component(name ${CMAKE_CURRENT_SOURCE_DIR} NAME)
  get_filename_component(kind_dir ${CMAKE_CURRENT_SOURCE_DIR} DIRECTORY)
  get_filename_component(kind ${kind_dir} NAME)
  set(target ${kind}_${name})

  add_library(${target}_objects OBJECT plugin.cpp ${name}.cpp)
  target_link_libraries(${target}_objects PUBLIC pithtrain::core)
  set_target_properties(${target}_objects PROPERTIES CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)

  add_library(${target} MODULE $<TARGET_OBJECTS:${target}_objects>)
  target_link_libraries(${target} PRIVATE pithtrain::core)
  set_target_properties(${target} PROPERTIES PREFIX "" OUTPUT_NAME ${target}
                        LIBRARY_OUTPUT_DIRECTORY ${PITHTRAIN_PLUGIN_OUTPUT_DIR})
  if(TARGET pithtrain_plugins)
    add_dependencies(pithtrain_plugins ${target})
  endif()

  file(GLOB test_source CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/test_${name}.cpp)
  if(PITHTRAIN_BUILD_TESTS AND test_source)
    add_executable(test_${target} test_${name}.cpp $<TARGET_OBJECTS:${target}_objects>)
    target_link_libraries(test_${target} PRIVATE pithtrain::core GTest::gtest_main)
    target_compile_definitions(test_${target} PRIVATE PITHTRAIN_PLUGIN_DIR="${PITHTRAIN_PLUGIN_OUTPUT_DIR}")
    add_dependencies(test_${target} pithtrain_plugins)
    gtest_discover_tests(test_${target} DISCOVERY_MODE PRE_TEST DISCOVERY_TIMEOUT 60)
  endif()
endfunction()
